"""The contract every pipeline step follows (datatrove-like, written our own way).

A step is a callable ``step(docs) -> docs``: a generator that takes an iterator of
:class:`Document` and yields the ones it keeps, counting what it keeps, drops and
changes and why, and (optionally) writing each dropped document with its reason to
a jsonl side file for audit and for the spot-check review.

Most steps judge one document at a time: they implement :meth:`Step.apply`, which
returns the (possibly modified) document to keep it or a reason string to drop it.
Keeping the per-document decision separate from the iteration is what lets the same
step run as a plain generator, inside ``datasets.map(num_proc=...)`` or in a Spark
``mapPartitions`` with identical results. Steps that need the whole stream (dedup)
override :meth:`Step.run` instead and still go through the same counting.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import IO, Iterable, Iterator

from dsv3.data.document import Document


class StepStats:
    """What a step saw: documents in, kept, dropped per reason, modified per reason."""

    def __init__(self) -> None:
        self.seen = 0
        self.kept = 0
        self.dropped: Counter[str] = Counter()
        self.modified: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()  # step-specific tallies (sentences seen, ...)

    def merge(self, other: "StepStats") -> None:
        """Add another shard's counts (a worker process, a Spark partition)."""
        self.seen += other.seen
        self.kept += other.kept
        self.dropped.update(other.dropped)
        self.modified.update(other.modified)
        self.counts.update(other.counts)

    def to_dict(self) -> dict:
        return {"seen": self.seen, "kept": self.kept,
                "dropped": sum(self.dropped.values()),
                "dropped_by_reason": dict(sorted(self.dropped.items())),
                "modified_by_reason": dict(sorted(self.modified.items())),
                "counts": dict(sorted(self.counts.items()))}

    @classmethod
    def from_dict(cls, d: dict) -> "StepStats":
        s = cls()
        s.seen, s.kept = d["seen"], d["kept"]
        s.dropped.update(d["dropped_by_reason"])
        s.modified.update(d["modified_by_reason"])
        s.counts.update(d.get("counts", {}))
        return s


class DroppedWriter:
    """Appends ``{"step", "reason", "document"}`` lines to a jsonl file; nothing is
    dropped silently when one is attached."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._file: IO[str] | None = open(self.path, "w", encoding="utf-8")

    def write(self, step: str, reason: str, doc: Document) -> None:
        if self._file is None:
            raise ValueError(f"DroppedWriter for {self.path!r} is closed")
        self._file.write(json.dumps({"step": step, "reason": reason,
                                     "document": doc.to_row()}, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Step:
    """Base class. Subclasses set ``name`` and implement :meth:`apply` (one document
    at a time) or override :meth:`run` (whole stream).

    ``domains``: when given, only documents of those domains are judged; the others
    pass through untouched (code should not be held to English prose rules)."""

    name = "step"
    # True for steps whose decision depends on earlier documents (dedup): they cannot
    # be spread over workers (dsv3.data.scale) and run in the driver
    stateful = False

    def __init__(self, *, domains: Iterable[str] | None = None,
                 dropped_writer: DroppedWriter | None = None) -> None:
        if domains is not None and (isinstance(domains, (str, bytes)) or not all(
                isinstance(d, str) for d in domains)):
            # a string would be taken letter by letter ("web" as {"w", "e", "b"}) and
            # the step would judge no document
            raise ValueError(f"domains must be a list of domain names, got {domains!r}")
        self.domains = frozenset(domains) if domains is not None else None
        self.dropped_writer = dropped_writer
        self.stats = StepStats()
        # set by the pipeline when a spot-check sample is wanted (dsv3.data.review)
        self.reviewer = None

    # --- the per-document decision -------------------------------------------------------
    def apply(self, doc: Document) -> Document | str:
        """Return the document (possibly modified) to keep it, or a reason to drop it."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply() or run()")

    def applies_to(self, doc: Document) -> bool:
        return self.domains is None or doc.domain in self.domains

    # --- bookkeeping shared by every step ------------------------------------------------
    def keep(self, doc: Document, text_before: str | None = None) -> Document:
        """Count ``doc`` as kept; ``text_before``: its text before this step changed it,
        so a reviewer sees both (what PII scrubbing or augmentation did)."""
        self.stats.kept += 1
        if self.reviewer is not None:
            self.reviewer.offer(self.name, "kept", None, doc, text_before)
        return doc

    def drop(self, doc: Document, reason: str) -> None:
        self.stats.dropped[reason] += 1
        if self.reviewer is not None:
            self.reviewer.offer(self.name, "dropped", reason, doc)
        doc.metadata["drop_step"] = self.name
        doc.metadata["drop_reason"] = reason
        if self.dropped_writer is not None:
            self.dropped_writer.write(self.name, reason, doc)

    def modified(self, reason: str, n: int = 1) -> None:
        self.stats.modified[reason] += n

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            self.stats.seen += 1
            if not self.applies_to(doc):  # passed through unjudged: not a review candidate
                self.stats.kept += 1
                yield doc
                continue
            before = doc.text
            result = self.apply(doc)
            if isinstance(result, str):
                self.drop(doc, result)
            else:
                yield self.keep(result, before if result.text != before else None)

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        return self.run(docs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
