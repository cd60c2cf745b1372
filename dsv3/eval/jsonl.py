"""Reading task files: one JSON object per line, with the fields a task needs checked
up front so a bad file fails with its path, line and field named, not mid-evaluation."""
from __future__ import annotations

import json
import os


def read_jsonl(path: str, required: tuple[str, ...], what: str = "path") -> list[dict]:
    """Rows of a jsonl file; blank lines are skipped, anything else must be an object
    holding every ``required`` field."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no file {path!r}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{what}: {path}:{number} is not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{what}: {path}:{number} must be a JSON object")
            missing = [field for field in required if field not in row]
            if missing:
                raise ValueError(f"{what}: {path}:{number} lacks the field(s) {missing}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{what}: {path} holds no rows")
    return rows
