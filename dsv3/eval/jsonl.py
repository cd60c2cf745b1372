"""Reading task files: one JSON object per line, with the fields a task needs checked
up front so a bad file fails with its path, line and field named, not mid-evaluation.

``read_jsonl_rows`` hands each row with its ``where`` ("WHAT: PATH:LINE"), which the
task's own row checks (``require_str``, ``multiple_choice.make_item``) put in front of
their messages."""
from __future__ import annotations

import json
import os


def read_jsonl_rows(path: str, required: tuple[str, ...],
                    what: str = "path") -> list[tuple[str, dict]]:
    """(where, row) per row of a jsonl file; blank lines are skipped, anything else must
    be an object holding every ``required`` field."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no file {path!r}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{what}: {path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where} must be a JSON object")
            missing = [field for field in required if field not in row]
            if missing:
                raise ValueError(f"{where} lacks the field(s) {missing}")
            rows.append((where, row))
    if not rows:
        raise ValueError(f"{what}: {path} holds no rows")
    return rows


def read_jsonl(path: str, required: tuple[str, ...], what: str = "path") -> list[dict]:
    """The rows of ``read_jsonl_rows`` without their line."""
    return [row for _, row in read_jsonl_rows(path, required, what)]


def require_str(row: dict, field: str, where: str) -> str:
    """``row[field]``, which must be a str: a number or list would only fail (or be
    scored as its repr) after the model ran."""
    value = row[field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got "
                         f"{type(value).__name__} {value!r}")
    return value
