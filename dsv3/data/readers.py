"""Readers for user data: local jsonl, parquet and text files, and any HF ``datasets``
dataset (a hub name where a network exists, or a builder over local files).

Every record becomes a :class:`Document` whose id names its file and line (or row),
so any later drop, PII hit or review verdict can be traced back to the source. A
record with an ``id`` field gets that id with its location appended
(``"7@data.jsonl:12"``; the bare id stays in ``metadata["id"]``): dumps and
concatenated shards repeat ids, and a location is unique, so ids are unique within a
run without remembering the ids already read (a set of them grew by one entry per
record: gigabytes at 100M records, where a reader streams in constant memory).

Malformed records (a line that is not JSON or not UTF-8, a missing or non-string text
field, a domain that cannot name a file) stop the run with an error naming file and
line, unless ``on_error="skip"``: then they are skipped and counted in
:class:`ReaderStats`, which ``prepare`` writes to its stats file, under a reason that
does not change from record to record ("invalid JSON"; the column is in the message
and the examples only). Nothing is lost silently either way. A text file is one
record: a line of it that is not UTF-8 is named by its line number, and skipping drops
that line alone from the file's document (counted, and ``skipped_lines`` in the
document's metadata), as skipping a jsonl line does. A file that cannot be read at all
(a corrupt parquet file, a directory, a truncated .gz) always stops the run, with its
name.

A jsonl or text file whose name ends in ``.gz``, ``.bz2``, ``.xz``/``.lzma`` or
``.zst``/``.zstd`` (the last with the ``zstandard`` package) is decompressed as it is
read, as datasets' text builder did; an archive (``.zip``, ``.tar*``) is refused with
what to do, and so is a compressed file whose name does not say so, since its bytes
are no text (it failed as "not UTF-8", or with skipping became a garbage document).

jsonl and text are read as bytes and decoded line by line here rather than with
``load_dataset("json"/"text")`` because those report a byte block or nothing at all
(``DatasetGenerationError``), not the file and line, and abort the whole file; parquet
goes through ``datasets`` (its schema is enforced by the format, so only the field
checks remain ours).
"""
from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import lzma
import os
import re
import warnings
import zlib
from collections import Counter
from contextlib import contextmanager
from typing import Iterator, NamedTuple, Sequence

from dsv3 import json_text
from dsv3.data.document import Document

FORMATS = ("jsonl", "parquet", "text")
ON_ERROR = ("raise", "skip")
# what a directory's files are usually called, for the glob an error suggests
_FORMAT_GLOBS = {"jsonl": "*.jsonl", "parquet": "*.parquet", "text": "*.txt"}
# prepare writes kept/<domain>.jsonl and tokens/<domain>.*: a domain is a file name
DOMAIN_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
DOMAIN_NAME_RULE = "use letters, digits, '_', '-', '.'"


class MalformedRecordError(ValueError):
    """A record that cannot become a document; the message names file and line."""


class UnreadableSourceError(ValueError):
    """A source file that cannot be read at all (a corrupt parquet file); the message
    names the source and the file. Never skipped: a whole file is not one bad record."""


class Problem(NamedTuple):
    """Why a record is malformed. ``reason`` is what the stats count under, the same for
    every record it fits (a key per JSON column or per type made one key per record);
    ``detail`` is this record's particulars, for its message and the examples."""

    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.reason} ({self.detail})" if self.detail else self.reason


def domain_name_problem(domain: object) -> str | None:
    """Why ``domain`` cannot be a domain's name, or None: checked where a domain enters
    (the config, each record as it is read), since prepare only needs it as a file name
    once the document is kept, after every step has run on everything before it."""
    if not isinstance(domain, str) or not domain:
        return f"expected a non-empty string, got {domain!r}"
    if not DOMAIN_NAME_RE.match(domain):
        return f"{domain!r} cannot name a file ({DOMAIN_NAME_RULE})"
    return None


class ReaderStats:
    def __init__(self) -> None:
        self.read = 0
        self.skipped: Counter[str] = Counter()
        self.examples: list[str] = []  # the first few skipped locations, for the stats file

    def skip(self, where: str, why: Problem) -> None:
        self.skipped[why.reason] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {why}")

    def to_dict(self) -> dict:
        return {"read": self.read, "skipped": sum(self.skipped.values()),
                "skipped_by_reason": dict(sorted(self.skipped.items())),
                "skipped_examples": list(self.examples)}


def expand_paths(paths: str | Sequence[str], label: str = "paths",
                 format: str | None = None) -> list[str]:
    """The files that ``paths`` (a glob pattern or a list of them) name, in pattern then
    name order; ``label`` names the setting in errors (``sources[2].paths``). A relative
    pattern is taken from the working directory: the error shows where it looked, since
    a config file elsewhere is the usual reason a pattern matches nothing. A directory
    is refused with the glob that names its files (``format`` picks the suffix): which
    of its files are data (hidden ones, subdirectories, a README) is the user's to say,
    and reading one as a file failed with "Is a directory" or "Unable to find"."""
    patterns = [paths] if isinstance(paths, (str, os.PathLike)) else paths
    if (not isinstance(patterns, (list, tuple)) or not patterns
            or not all(isinstance(p, (str, os.PathLike)) for p in patterns)):
        raise ValueError(f"{label}: expected a glob pattern or a non-empty list of them, "
                         f"got {paths!r}")
    files: list[str] = []
    seen: dict[str, str] = {}  # real path -> the pattern that named it first
    for pattern in patterns:
        pattern = os.fspath(pattern)
        matched = sorted(glob.glob(pattern))
        if not matched:
            where = ("" if os.path.isabs(pattern)
                     else ": a relative path is taken from the working directory")
            raise FileNotFoundError(f"{label}: nothing matches {pattern!r} (looked for "
                                    f"{os.path.abspath(pattern)!r}{where})")
        for path in matched:
            if os.path.isdir(path):
                _directory_error(label, pattern, path, format)
            real = os.path.realpath(path)
            if real in seen:
                # overlapping patterns (a file and a glob over its folder): read twice,
                # its documents would count double under the same ids
                warnings.warn(f"{label}: {path!r} (matched by {pattern!r}) is already read "
                              f"through {seen[real]!r}; reading it once", stacklevel=2)
                continue
            seen[real] = pattern
            files.append(path)
    return files


def _directory_error(label: str, pattern: str, path: str, format: str | None) -> None:
    by = "" if path == pattern else f" (matched by {pattern!r})"
    wanted = os.path.join(path, _FORMAT_GLOBS.get(format or "", "*"))
    raise ValueError(f"{label}: {path!r} is a directory{by}; name the files in it with a "
                     f"glob such as {wanted!r}")


def _doc_id(record: dict, where: str) -> str:
    """The record's location, after its own id when it has one: unique within a run
    because the location is (so a repeated id needs no memory of earlier ones), and
    still naming the id the source gave it."""
    return f"{record['id']}@{where}" if record.get("id") is not None else where


def _record_to_doc(record: object, where: str, text_field: str, domain_field: str | None,
                   default_domain: str) -> Document | Problem:
    """The document, or why the record is malformed."""
    if not isinstance(record, dict):
        return Problem("record is not an object", f"a {type(record).__name__}")
    if text_field not in record:
        return Problem(f"missing field {text_field!r}")
    text = record[text_field]
    if text is None:  # a parquet column's null, a jsonl "text": null
        return Problem(f"field {text_field!r} is null")
    if not isinstance(text, str):
        return Problem(f"field {text_field!r} is not a string", f"a {type(text).__name__}")
    domain = record.get(domain_field) if domain_field else None
    if domain is not None:
        # checked here, with the record's file and line, rather than when the document is
        # kept, after every step has run on all the documents before it
        why = domain_name_problem(domain)
        if why is not None:
            return Problem(f"field {domain_field!r} is not a domain name", why)
    meta = {k: v for k, v in record.items() if k not in (text_field, domain_field)
            and isinstance(v, (str, int, float, bool))}
    meta["source"] = where
    return Document(id=_doc_id(record, where), text=text, domain=domain or default_domain,
                    metadata=meta)


def _check_options(on_error: str, default_domain: str, label: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {list(ON_ERROR)}, got {on_error!r}")
    why = domain_name_problem(default_domain)
    if why is not None:
        raise ValueError(f"{label}default_domain: {why}")


def read_documents(paths: str | Sequence[str], *, format: str = "jsonl",
                   text_field: str = "text", domain_field: str | None = "domain",
                   default_domain: str = "default", on_error: str = "raise",
                   stats: ReaderStats | None = None, source: str | None = None
                   ) -> Iterator[Document]:
    """Documents from local files (glob patterns allowed), in file then line order.

    ``format``: ``jsonl`` (one JSON object per line), ``parquet`` (one row per record)
    or ``text`` (one document per file). ``on_error``: ``raise`` or ``skip``.
    ``source``: the setting these come from (``sources[2]``), put before every error."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    label = f"{source}." if source else ""
    _check_options(on_error, default_domain, label)
    stats = stats if stats is not None else ReaderStats()
    located = (item for path in expand_paths(paths, f"{label}paths", format)
               for item in _located(path, format, source))
    yield from _documents(located, text_field, domain_field, default_domain, on_error, stats,
                          source)


def read_hf_dataset(name: str, *, config: str | None = None, split: str = "train",
                    data_files=None, streaming: bool = True, text_field: str = "text",
                    domain_field: str | None = "domain", default_domain: str = "default",
                    on_error: str = "raise", stats: ReaderStats | None = None,
                    source: str | None = None) -> Iterator[Document]:
    """Documents from ``datasets.load_dataset(name, config, split=...)``: a hub name
    where a network exists, or a builder such as "parquet" with local ``data_files``.
    Streaming by default, so a large hub dataset is read as it is processed."""
    _check_options(on_error, default_domain, f"{source}." if source else "")
    import datasets
    stats = stats if stats is not None else ReaderStats()
    ds = datasets.load_dataset(name, config, split=split, data_files=data_files,
                               streaming=streaming)
    located = ((f"{name}[{split}]:{n}", f"{name} [{split}], row {n}", row, None)
               for n, row in enumerate(ds, start=1))
    yield from _documents(located, text_field, domain_field, default_domain, on_error, stats,
                          source)


def _documents(located, text_field: str, domain_field: str | None, default_domain: str,
               on_error: str, stats: ReaderStats, source: str | None) -> Iterator[Document]:
    """(id/location, location for messages, record, problem) -> documents, with
    malformed records raised or skipped and counted."""
    for where, message_where, record, problem in located:
        result = problem if problem is not None else _record_to_doc(
            record, where, text_field, domain_field, default_domain)
        if isinstance(result, Problem):
            if on_error == "raise":
                raise MalformedRecordError(
                    f"{source + ': ' if source else ''}{message_where}: {result} (pass "
                    f"on_error='skip' / --skip-malformed to skip and count such records)")
            stats.skip(where, result)
            continue
        stats.read += 1
        yield result


def _located(path: str, format: str, source: str | None
             ) -> Iterator[tuple[str, str, object, Problem | None]]:
    """(id/location, location for messages, record, problem) of one file."""
    if format == "text":
        yield from _text_file(path, source)
        return
    what = "line" if format == "jsonl" else "row"
    records = (jsonl_records(path, source) if format == "jsonl"
               else _parquet_records(path, source))
    for n, record, problem in records:
        yield f"{path}:{n}", f"{path}, {what} {n}", record, problem


def jsonl_records(path: str, source: str | None = None
                  ) -> Iterator[tuple[int, object, Problem | None]]:
    """(line number from 1, record, problem or None); ``source`` (``sources[2]``) is put
    before the errors of a file that cannot be read. Also the reader of the quality
    labels and review verdicts files."""
    # bytes, each line decoded on its own: a text-mode file decodes 8 KiB ahead, so a
    # bad byte surfaced on an earlier line's number and left no place to resume from
    line_no = 0
    for chunk in _binary_lines(path, source):
        # \r and \r\n end lines too, as in the text mode this replaced: line
        # numbers (and so document ids) stay what they were
        for raw in chunk.splitlines():
            line_no += 1
            try:
                # A byte-order mark (Windows tools write one) opens the file, not the
                # first record: JSON may not start with one.
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield line_no, None, Problem("not UTF-8", e.reason)
                continue
            if not line.strip():
                continue
            try:
                yield line_no, json_text.loads(line), None
            except json.JSONDecodeError as e:
                yield line_no, None, Problem("invalid JSON", f"{e.msg} at column {e.colno}")
            except json_text.LoneSurrogateError as e:
                yield line_no, None, Problem("not UTF-8", str(e))


def _parquet_records(path: str, source: str | None) -> Iterator[tuple[int, object, None]]:
    """(row number from 1, record, None). A file Arrow cannot read ends the run with its
    name: datasets named it only in a log line before the bare Arrow message."""
    import datasets
    import pyarrow.parquet as pq
    try:  # builds the whole split here: reading the rows after this cannot fail so
        if pq.ParquetFile(path).metadata.num_rows == 0:
            # Spark and pandas write empty part files; datasets refuses them ("BatchSize
            # must be greater than 0"), and they hold no documents to lose
            return
        ds = datasets.load_dataset("parquet", data_files=path, split="train")
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as e:
        cause = e.__cause__ or e  # DatasetGenerationError's own message says nothing
        raise UnreadableSourceError(f"{source + ': ' if source else ''}{path}: cannot be "
                                    f"read as parquet ({type(cause).__name__}: {cause})") from e
    for i, row in enumerate(ds, start=1):
        yield i, row, None


def _text_file(path: str, source: str | None
               ) -> Iterator[tuple[str, str, object, Problem | None]]:
    """The file as one record (id: the path), after one problem per line that is not
    UTF-8 (id ``path:line``). Decoded as datasets' text builder did (UTF-8, universal
    newlines, a BOM kept, a compressed file decompressed), so a clean file's document is
    what it was; a bad line is named rather than failing the whole file without a name."""
    data = _read_all(path, source)
    try:
        text, bad = data.decode("utf-8"), 0
    except UnicodeDecodeError:
        kept = []
        bad = 0
        # a UTF-8 sequence holds no \n or \r byte, so splitting the bytes first cuts no
        # character; bytes.splitlines ends lines where universal newlines do
        for n, raw in enumerate(data.splitlines(keepends=True), start=1):
            try:
                kept.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                bad += 1
                yield f"{path}:{n}", f"{path}, line {n}", None, Problem("not UTF-8", e.reason)
        text = "".join(kept)
    record: dict = {"text": text.replace("\r\n", "\n").replace("\r", "\n")}
    if bad:  # the document says it is not the whole file
        record["skipped_lines"] = bad
    yield path, path, record, None


# -- compressed files ----------------------------------------------------------------
# Chosen by the name's suffix. datasets chose by the first bytes; a name that does not
# say what a file is gets refused below instead of guessed at.
_COMPRESSION_SUFFIXES = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".lzma": "xz",
                         ".zst": "zstd", ".zstd": "zstd"}
_SUFFIX_OF = {"gzip": ".gz", "bz2": ".bz2", "xz": ".xz", "zstd": ".zst"}
_ARCHIVE_SUFFIXES = {".zip": "zip", ".tar": "tar", ".tgz": "tar", ".tbz2": "tar",
                     ".txz": "tar", ".7z": "7z", ".rar": "rar", ".lz4": "lz4"}
# the first bytes of compressed files and archives; none of them starts UTF-8 text
_MAGIC = [(re.compile(rb"\x1f\x8b"), "gzip"), (re.compile(rb"\xfd7zXZ\x00"), "xz"),
          (re.compile(rb"\x28\xb5\x2f\xfd"), "zstd"),
          (re.compile(rb"BZh[1-9](1AY&SY|\x17rE8P\x90)"), "bz2"),
          (re.compile(rb"PK(\x03\x04|\x05\x06)"), "zip"),
          (re.compile(rb"7z\xbc\xaf\x27\x1c"), "7z"), (re.compile(rb"Rar!\x1a\x07"), "rar"),
          (re.compile(rb"\x04\x22\x4d\x18"), "lz4")]
_DECOMPRESSION_ERRORS: tuple[type[BaseException], ...] = (
    OSError, EOFError, zlib.error, lzma.LZMAError)


def _compression(path: str, source: str | None) -> str | None:
    """The compression ``path``'s name says it has (None: a plain file); an archive or a
    format not read here is refused."""
    name = os.path.basename(path).lower()
    stem, suffix = os.path.splitext(name)
    compression = _COMPRESSION_SUFFIXES.get(suffix)
    if compression is not None:
        name = stem
        suffix = os.path.splitext(stem)[1]
    archive = _ARCHIVE_SUFFIXES.get(suffix)
    if archive is not None:
        what = "archive" if archive != "lz4" else "file"
        raise UnreadableSourceError(f"{_where(source, path)}: a {archive} {what} is not read "
                                    f"here: extract it and name its files in paths")
    return compression


def _where(source: str | None, path: str) -> str:
    return f"{source}: {path}" if source else path


@contextmanager
def _open_binary(path: str, source: str | None):
    """``path`` opened for reading bytes, decompressed as its name says; with the
    compression (None for a plain file)."""
    compression = _compression(path, source)
    if compression is None:
        with open(path, "rb") as f:
            head = f.peek(16)[:16]
            for magic, kind in _MAGIC:
                if magic.match(head):
                    what = (f"is {kind}-compressed, but its name does not end in "
                            f"{_SUFFIX_OF[kind]}: rename it so that it is decompressed"
                            if kind in _SUFFIX_OF else
                            f"is a {kind} {'archive' if kind != 'lz4' else 'file'}, not "
                            f"text: extract it and name its files in paths")
                    raise UnreadableSourceError(f"{_where(source, path)}: {what}")
            yield f, None
        return
    if compression == "gzip":
        f = gzip.open(path, "rb")
    elif compression == "bz2":
        f = bz2.open(path, "rb")
    elif compression == "xz":
        f = lzma.open(path, "rb")  # .xz and the older .lzma, told apart by their bytes
    else:
        try:
            import zstandard
        except ImportError:
            raise UnreadableSourceError(
                f"{_where(source, path)}: a zstd-compressed file needs the zstandard "
                f"package (pip install zstandard), or decompress it first") from None
        f = io.BufferedReader(_ZstdReader(open(path, "rb"), zstandard))
    with f:
        yield f, compression


def _decompression_error(path: str, source: str | None, compression: str,
                         e: BaseException) -> UnreadableSourceError:
    return UnreadableSourceError(f"{_where(source, path)}: cannot be decompressed as "
                                 f"{compression} ({type(e).__name__}: {e})")


def _errors_of(compression: str) -> tuple[type[BaseException], ...]:
    if compression == "zstd":
        import zstandard
        return _DECOMPRESSION_ERRORS + (zstandard.ZstdError,)
    return _DECOMPRESSION_ERRORS


def _binary_lines(path: str, source: str | None) -> Iterator[bytes]:
    """The file's bytes a line (up to a newline byte) at a time, streamed, decompressed
    as its name says; a decompression error is raised naming the source and the file
    (never a "not UTF-8" line to skip)."""
    with _open_binary(path, source) as (f, compression):
        if compression is None:
            yield from f
            return
        errors = _errors_of(compression)
        lines = iter(f)
        while True:
            try:
                chunk = next(lines)
            except StopIteration:
                return
            except errors as e:
                raise _decompression_error(path, source, compression, e) from e
            yield chunk


def _read_all(path: str, source: str | None) -> bytes:
    """The file's bytes, decompressed as its name says (a text file is one document,
    read whole as datasets' text builder did)."""
    with _open_binary(path, source) as (f, compression):
        try:
            return f.read()
        except _errors_of(compression) if compression else () as e:
            raise _decompression_error(path, source, compression, e) from e


class _ZstdReader(io.RawIOBase):
    """A zstd stream, frame after frame, that raises on a truncated last frame:
    zstandard's own stream reader ends such a file early without a word."""

    def __init__(self, raw, zstandard) -> None:
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None  # the decompressor of the frame being read
        self._buffer = b""
        self._pos = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._pos >= len(self._buffer):
            if self._done:
                return 0
            self._fill()
        n = min(len(b), len(self._buffer) - self._pos)
        b[:n] = self._buffer[self._pos:self._pos + n]
        self._pos += n
        return n

    def _fill(self) -> None:
        data = self._raw.read(1 << 16)
        if not data:
            if self._frame is not None and not self._frame.eof:
                raise EOFError("compressed file ended before the end-of-stream marker "
                               "was reached")
            self._done = True
            return
        out = []
        while data:
            if self._frame is None or self._frame.eof:
                self._frame = self._dctx.decompressobj()
            out.append(self._frame.decompress(data))
            data = self._frame.unused_data if self._frame.eof else b""
        self._buffer, self._pos = b"".join(out), 0

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()
