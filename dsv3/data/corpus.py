"""The embedded default corpus: real text that ships with every Python installation.

So that ``dsv3 data prepare`` and ``make demo`` need no download, the default corpus
is read from the running interpreter itself, in three domains:

- ``reference``: the language reference topics ``pydoc`` shows (``pydoc_data.topics``),
  prose written by the CPython documentation authors;
- ``docstrings``: each standard-library module's docstrings (module, classes,
  functions) gathered into one document per module, read with ``ast`` so nothing is
  imported or executed;
- ``code``: the standard-library source files themselves.

The cost: the text depends on the Python version (3.11 and 3.12 differ), so the corpus
is deterministic per installation, not across them. Nothing here is text the project
wrote.
"""
from __future__ import annotations

import ast
import os
import sysconfig
from typing import Iterator, Sequence

from dsv3.data.document import Document

DOMAINS = ("reference", "docstrings", "code")

# Directories of the standard library that are test suites, demos, vendored wheels or
# tools rather than library text.
_SKIP_DIRS = frozenset({"test", "tests", "site-packages", "idlelib", "lib2to3", "turtledemo",
                        "ensurepip", "__pycache__", "tkinter", "venv", "pydoc_data"})


def _stdlib_sources() -> list[tuple[str, str]]:
    """(module name, path) of every library .py file, sorted so the order is stable."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        parts = [] if rel == "." else rel.split(os.sep)
        if any(p in _SKIP_DIRS or p.startswith("config-") for p in parts):
            dirnames[:] = []
            continue
        for name in filenames:
            if name.endswith(".py"):
                module = ".".join(parts + [name[:-3]]).removesuffix(".__init__")
                found.append((module, os.path.join(dirpath, name)))
    return sorted(found)


def _reference_docs() -> Iterator[Document]:
    from pydoc_data.topics import topics
    for name in sorted(topics):
        yield Document(id=f"reference/{name}", text=topics[name].strip(), domain="reference",
                       metadata={"source": "pydoc_data.topics", "name": name})


def _docstrings(tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                found.append(doc)
    return found


def _source_docs(domains: frozenset[str]) -> Iterator[Document]:
    for module, path in _stdlib_sources():
        with open(path, encoding="utf-8", errors="replace") as f:
            source = f.read()
        # one group: a held-out module's docstrings are not in training (dsv3.data.heldout)
        meta = {"source": "stdlib", "name": module, "group": f"stdlib/{module}"}
        if "docstrings" in domains:
            try:
                docs = _docstrings(ast.parse(source))
            except SyntaxError:  # a file written for another Python version
                docs = []
            if docs:
                yield Document(id=f"docstrings/{module}", text="\n\n".join(docs),
                               domain="docstrings", metadata=dict(meta))
        if "code" in domains and source.strip():
            yield Document(id=f"code/{module}", text=source, domain="code", metadata=dict(meta))


def embedded_corpus(domains: Sequence[str] = DOMAINS,
                    max_docs_per_domain: int | None = None) -> Iterator[Document]:
    """Documents of the embedded corpus, in a fixed order: reference topics by name,
    then per stdlib module its docstrings and its source."""
    unknown = sorted(set(domains) - set(DOMAINS))
    if unknown:
        raise ValueError(f"domains: unknown embedded domains {unknown}; "
                         f"choose from {list(DOMAINS)}")
    if max_docs_per_domain is not None and max_docs_per_domain < 1:
        raise ValueError(f"max_docs_per_domain must be >= 1 or None, got {max_docs_per_domain}")
    wanted = frozenset(domains)
    counts = dict.fromkeys(DOMAINS, 0)
    sources = []
    if "reference" in wanted:
        sources.append((_reference_docs(), {"reference"}))
    if wanted & {"docstrings", "code"}:
        sources.append((_source_docs(wanted), wanted & {"docstrings", "code"}))
    for docs, its_domains in sources:
        for doc in docs:
            if max_docs_per_domain is None or counts[doc.domain] < max_docs_per_domain:
                counts[doc.domain] += 1
                yield doc
            elif all(counts[d] >= max_docs_per_domain for d in its_domains):
                break  # stop reading (and parsing) files nobody will take


def embedded_corpus_dataset(domains: Sequence[str] = DOMAINS,
                            max_docs_per_domain: int | None = None):
    """The embedded corpus as a HF ``datasets.Dataset`` (columns id, text, domain, source, name)."""
    import datasets
    rows = [{"id": d.id, "text": d.text, "domain": d.domain, **d.metadata}
            for d in embedded_corpus(domains, max_docs_per_domain)]
    return datasets.Dataset.from_list(rows)
