"""Reading task files: one JSON object per line, with the fields a task needs checked
up front so a bad file fails with its path, line and field named, not mid-evaluation.

``read_jsonl_rows`` hands each row with its ``where`` ("WHAT: PATH:LINE"), which the
task's own row checks (``require_str``, ``multiple_choice.make_item``) put in front of
their messages. Files are read as bytes and decoded line by line (``read_lines``,
``read_text``), so a byte that is not UTF-8 is reported at its line, not as Python's
"can't decode byte 0xff in position 55" of no file at all."""
from __future__ import annotations

import json
import os

from dsv3 import json_text


def _decode(line: bytes, where: str) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 ({e.reason}: byte 0x{line[e.start]:02x}, "
                         f"byte {e.start + 1} of the line)") from None


def read_lines(path: str, what: str) -> list[tuple[int, str]]:
    """(line number, text) per line of a UTF-8 text file, the line ending removed."""
    if os.path.isdir(path):
        raise ValueError(f"{what}: {path!r} is a directory, not a file")
    if not os.path.exists(path):  # not isfile: a pipe (<(zcat x.gz)) or a device reads too
        raise FileNotFoundError(f"{what}: no file {path!r}")
    with open(path, "rb") as f:
        raw = f.read()
    # A byte-order mark (Windows tools write one) opens the file, not its first line.
    lines = raw.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the newline that ends the last line starts no line
    return [(number, _decode(line.rstrip(b"\r"), f"{what}: {path}:{number}"))
            for number, line in enumerate(lines, 1)]


def read_text(path: str, what: str) -> str:
    """The whole of a UTF-8 text file (a JSON spec, say), its bad bytes named by line."""
    return "\n".join(text for _, text in read_lines(path, what))


def read_jsonl_rows(path: str, required: tuple[str, ...],
                    what: str = "path") -> list[tuple[str, dict]]:
    """(where, row) per row of a jsonl file; blank lines are skipped, anything else must
    be an object holding every ``required`` field."""
    rows = []
    for number, line in read_lines(path, what):
        if not line.strip():
            continue
        where = f"{what}: {path}:{number}"
        try:
            row = json_text.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not JSON ({e.msg})") from None
        except json_text.LoneSurrogateError as e:
            raise ValueError(f"{where}: {e}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where} must be a JSON object")
        missing = [field for field in required if field not in row]
        if missing:
            raise ValueError(f"{where} lacks the field(s) {missing}")
        rows.append((where, row))
    if not rows:
        raise ValueError(f"{what}: {path} holds no rows")
    return rows


def require_str(row: dict, field: str, where: str) -> str:
    """``row[field]``, which must be a str: a number or list would only fail (or be
    scored as its repr) after the model ran."""
    value = row[field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got "
                         f"{type(value).__name__} {value!r}")
    return value
