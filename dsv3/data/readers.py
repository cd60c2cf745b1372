"""Readers for user data: local jsonl, parquet and text files, and any HF ``datasets``
dataset (a hub name where a network exists, or a builder over local files).

Every record becomes a :class:`Document` whose id names its file and line (or row),
so any later drop, PII hit or review verdict can be traced back to the source. A
record with an ``id`` field gets that id with its location appended
(``"7@data.jsonl:12"``; the bare id stays in ``metadata["id"]``): dumps and
concatenated shards repeat ids, and a location is unique, so ids are unique within a
run without remembering the ids already read (a set of them grew by one entry per
record: gigabytes at 100M records, where a reader streams in constant memory).

Malformed records (a line that is not JSON, a missing or non-string text field) stop
the run with an error naming file and line, unless ``on_error="skip"``: then they are
skipped and counted in :class:`ReaderStats`, which ``prepare`` writes to its stats
file. Nothing is lost silently either way.

jsonl is parsed line by line here rather than with ``load_dataset("json")`` because
the Arrow JSON reader reports a byte block, not the line, and aborts the whole file;
parquet and text go through ``datasets`` (their schema is enforced by the format, so
only the field checks remain ours).
"""
from __future__ import annotations

import glob
import json
import os
from collections import Counter
from typing import Iterator, Sequence

from dsv3.data.document import Document

FORMATS = ("jsonl", "parquet", "text")
ON_ERROR = ("raise", "skip")


class MalformedRecordError(ValueError):
    """A record that cannot become a document; the message names file and line."""


class ReaderStats:
    def __init__(self) -> None:
        self.read = 0
        self.skipped: Counter[str] = Counter()
        self.examples: list[str] = []  # the first few skipped locations, for the stats file

    def skip(self, where: str, why: str) -> None:
        self.skipped[why] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {why}")

    def to_dict(self) -> dict:
        return {"read": self.read, "skipped": sum(self.skipped.values()),
                "skipped_by_reason": dict(sorted(self.skipped.items())),
                "skipped_examples": list(self.examples)}


def expand_paths(paths: str | Sequence[str], label: str = "paths") -> list[str]:
    """The files that ``paths`` (a glob pattern or a list of them) name, in pattern then
    name order; ``label`` names the setting in errors (``sources[2].paths``). A relative
    pattern is taken from the working directory: the error shows where it looked, since
    a config file elsewhere is the usual reason a pattern matches nothing."""
    patterns = [paths] if isinstance(paths, (str, os.PathLike)) else paths
    if (not isinstance(patterns, (list, tuple)) or not patterns
            or not all(isinstance(p, (str, os.PathLike)) for p in patterns)):
        raise ValueError(f"{label}: expected a glob pattern or a non-empty list of them, "
                         f"got {paths!r}")
    files: list[str] = []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        matched = sorted(glob.glob(pattern))
        if not matched:
            where = ("" if os.path.isabs(pattern)
                     else ": a relative path is taken from the working directory")
            raise FileNotFoundError(f"{label}: nothing matches {pattern!r} (looked for "
                                    f"{os.path.abspath(pattern)!r}{where})")
        files.extend(matched)
    return files


def _doc_id(record: dict, where: str) -> str:
    """The record's location, after its own id when it has one: unique within a run
    because the location is (so a repeated id needs no memory of earlier ones), and
    still naming the id the source gave it."""
    return f"{record['id']}@{where}" if "id" in record else where


def _record_to_doc(record: object, where: str, text_field: str, domain_field: str | None,
                   default_domain: str) -> Document | str:
    """The document, or why the record is malformed."""
    if not isinstance(record, dict):
        return f"record is a {type(record).__name__}, not an object"
    text = record.get(text_field)
    if text is None:
        return f"missing field {text_field!r}"
    if not isinstance(text, str):
        return f"field {text_field!r} is a {type(text).__name__}, not a string"
    domain = record.get(domain_field) if domain_field else None
    if domain is not None and (not isinstance(domain, str) or not domain):
        return f"field {domain_field!r} must be a non-empty string, got {domain!r}"
    meta = {k: v for k, v in record.items() if k not in (text_field, domain_field)
            and isinstance(v, (str, int, float, bool))}
    meta["source"] = where
    return Document(id=_doc_id(record, where), text=text, domain=domain or default_domain,
                    metadata=meta)


def read_documents(paths: str | Sequence[str], *, format: str = "jsonl",
                   text_field: str = "text", domain_field: str | None = "domain",
                   default_domain: str = "default", on_error: str = "raise",
                   stats: ReaderStats | None = None) -> Iterator[Document]:
    """Documents from local files (glob patterns allowed), in file then line order.

    ``format``: ``jsonl`` (one JSON object per line), ``parquet`` (one row per record)
    or ``text`` (one document per file). ``on_error``: ``raise`` or ``skip``."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {list(ON_ERROR)}, got {on_error!r}")
    stats = stats if stats is not None else ReaderStats()
    what = "line" if format == "jsonl" else "row"
    located = ((f"{path}:{n}" if format != "text" else path, f"{path}, {what} {n}", record,
                error) for path in expand_paths(paths)
               for n, record, error in _records(path, format))
    yield from _documents(located, text_field, domain_field, default_domain, on_error, stats)


def read_hf_dataset(name: str, *, config: str | None = None, split: str = "train",
                    data_files=None, streaming: bool = True, text_field: str = "text",
                    domain_field: str | None = "domain", default_domain: str = "default",
                    on_error: str = "raise", stats: ReaderStats | None = None
                    ) -> Iterator[Document]:
    """Documents from ``datasets.load_dataset(name, config, split=...)``: a hub name
    where a network exists, or a builder such as "parquet" with local ``data_files``.
    Streaming by default, so a large hub dataset is read as it is processed."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {list(ON_ERROR)}, got {on_error!r}")
    import datasets
    stats = stats if stats is not None else ReaderStats()
    ds = datasets.load_dataset(name, config, split=split, data_files=data_files,
                               streaming=streaming)
    located = ((f"{name}[{split}]:{n}", f"{name} [{split}], row {n}", row, None)
               for n, row in enumerate(ds, start=1))
    yield from _documents(located, text_field, domain_field, default_domain, on_error, stats)


def _documents(located, text_field: str, domain_field: str | None, default_domain: str,
               on_error: str, stats: ReaderStats) -> Iterator[Document]:
    """(id/location, location for messages, record, parse error) -> documents, with
    malformed records raised or skipped and counted."""
    for where, message_where, record, error in located:
        result = error if error is not None else _record_to_doc(
            record, where, text_field, domain_field, default_domain)
        if isinstance(result, str):
            if on_error == "raise":
                raise MalformedRecordError(
                    f"{message_where}: {result} (pass on_error='skip' / --skip-malformed to "
                    f"skip and count such records)")
            stats.skip(where, result.split(":")[0])
            continue
        stats.read += 1
        yield result


def _records(path: str, format: str) -> Iterator[tuple[int, object, str | None]]:
    """(line or row number from 1, record, parse error or None)."""
    if format == "jsonl":
        # bytes, each line decoded on its own: a text-mode file decodes 8 KiB ahead, so a
        # bad byte surfaced on an earlier line's number and left no place to resume from
        with open(path, "rb") as f:
            line_no = 0
            for chunk in f:
                # \r and \r\n end lines too, as in the text mode this replaced: line
                # numbers (and so document ids) stay what they were
                for raw in chunk.splitlines():
                    line_no += 1
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        yield line_no, None, f"not UTF-8 ({e.reason})"
                        continue
                    if not line.strip():
                        continue
                    try:
                        yield line_no, json.loads(line), None
                    except json.JSONDecodeError as e:
                        yield line_no, None, f"invalid JSON ({e.msg} at column {e.colno})"
        return
    import datasets
    if format == "parquet":
        ds = datasets.load_dataset("parquet", data_files=path, split="train")
        for i, row in enumerate(ds, start=1):
            yield i, row, None
    else:  # text: the whole file is one document
        ds = datasets.load_dataset("text", data_files=path, split="train", sample_by="document")
        for i, row in enumerate(ds, start=1):
            yield i, {"text": row["text"]}, None
