"""Text for the built-in tasks, read from the Python installation itself (the same
source the data pipeline ships): the ``pydoc_data.topics`` pages (the language
reference as ``help()`` shows it) and the docstrings of a fixed list of stdlib
modules, as (domain, text) documents in a stable order.

The held-out split is chosen by a hash of each document's text (crc32 mod 10 == 0,
about 10%), so it is the same on every run and machine with the same Python. It is
**not** the trainer's held-out set: the data pipeline draws its own split from the same
text, so a model trained on the demo corpus has seen most of these documents. A
checkpoint's own ``heldout.jsonl`` (the documents its run held out, exported by the
trainer) is what ``dsv3 eval`` reads by default; this split is the fallback for a
checkpoint without one. Any ``list[(domain, text)]`` can be passed to the built-in
tasks instead (``documents=``), e.g. ``read_documents`` of a jsonl of
{"domain", "text"} rows.
"""
from __future__ import annotations

import importlib
import inspect
import zlib

from dsv3.eval.jsonl import read_jsonl_rows, require_str

# Pure-Python modules with long docstrings, present on every CPython 3.10+.
STDLIB_MODULES = ("argparse", "ast", "calendar", "collections", "csv", "dataclasses", "difflib",
                  "email.message", "fractions", "functools", "heapq", "inspect", "json",
                  "logging", "pathlib", "pickle", "random", "shutil", "statistics", "string",
                  "tarfile", "textwrap", "threading", "unittest", "zipfile")
MIN_CHARS = 200


def pydoc_topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics
    return [("pydoc-topics", topics[name].strip()) for name in sorted(topics)
            if len(topics[name].strip()) >= MIN_CHARS]


def stdlib_docstrings() -> list[tuple[str, str]]:
    """One document per module: its docstring, then those of its public classes and
    functions (defined there, not imported), by name."""
    documents = []
    for module_name in STDLIB_MODULES:
        module = importlib.import_module(module_name)
        parts = [inspect.getdoc(module) or ""]
        for name, member in sorted(vars(module).items()):
            if (not name.startswith("_") and (inspect.isclass(member) or inspect.isfunction(member))
                    and getattr(member, "__module__", None) == module_name):
                parts.append(inspect.getdoc(member) or "")
        text = "\n\n".join(p for p in parts if p).strip()
        if len(text) >= MIN_CHARS:
            documents.append(("stdlib-docs", text))
    return documents


def embedded_documents() -> list[tuple[str, str]]:
    return pydoc_topics() + stdlib_docstrings()


def is_held_out(text: str) -> bool:
    return zlib.crc32(text.encode("utf-8")) % 10 == 0


def held_out_documents() -> list[tuple[str, str]]:
    """The held-out 10% of the embedded corpus (see the module docstring)."""
    return [(domain, text) for domain, text in embedded_documents() if is_held_out(text)]


def read_documents(path: str, what: str = "corpus file") -> list[tuple[str, str]]:
    """(domain, text) documents from a jsonl of {"domain", "text"} rows, both strings (a
    null text would otherwise be scored as the word "None"); errors name ``what`` (the
    CLI's option)."""
    return [(require_str(row, "domain", where), require_str(row, "text", where))
            for where, row in read_jsonl_rows(path, ("domain", "text"), what=what)]
