"""The one record every data step passes along.

A plain dataclass rather than a dict so a typo in a field name fails loudly, and
rather than a HF ``datasets`` row so steps stay usable as plain Python generators
(datatrove's contract) while ``to_row``/``from_row`` carry documents through
``datasets.map`` or Spark unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator


@dataclass
class Document:
    """``id`` is unique within a run (readers build it from file and line), ``domain``
    names the mixture bucket the document feeds, ``metadata`` holds what steps learn
    about it (drop reason, PII counts, quality score, augmentation flag)."""

    id: str
    text: str
    domain: str = "default"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str):
            raise TypeError(f"Document.id must be a str, got {type(self.id).__name__}")
        if not isinstance(self.text, str):
            raise TypeError(f"Document.text must be a str, got {type(self.text).__name__} "
                            f"(document {self.id!r})")
        if not isinstance(self.domain, str) or not self.domain:
            raise ValueError(f"Document.domain must be a non-empty str, got {self.domain!r} "
                             f"(document {self.id!r})")
        # each document owns its metadata: steps write drop reasons and scores into it,
        # and a dict shared by two documents (one source record read twice) would leak
        # one's drop reason into the other
        self.metadata = dict(self.metadata)

    def to_row(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "domain": self.domain,
                "metadata": dict(self.metadata)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Document":
        return cls(id=row["id"], text=row["text"], domain=row.get("domain") or "default",
                   metadata=dict(row.get("metadata") or {}))


def documents_from_rows(rows: Iterable[dict[str, Any]]) -> Iterator[Document]:
    for row in rows:
        yield Document.from_row(row)
