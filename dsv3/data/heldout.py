"""The held-out documents, chosen when the data is prepared.

Why here and not in the trainer: augmentation rewrites documents at prepare time, and
a split made afterwards (the trainer's own, before this) held out augmented text, which
``dsv3 eval`` then scored. Chosen here, before any step runs, the held-out documents
pass every cleaning step (dedup against the rest, PII, filters) but are never
augmented, and they are written last in each domain's token stream with their count
in the token manifest, so every run on the data holds out the same ones.

A document is held out when a seeded hash of its group falls below ``fraction``: a
decision per document, the same in any order and in any worker (the datasets and Spark
backends). Related documents share a group, ``metadata["group"]`` (a ``group`` field
of a jsonl or parquet record lands there; the embedded corpus gives each stdlib
module's code and docstrings one), so they fall on the same side: a held-out module's
docstrings are not in training. A document without a group is hashed by its text as
read, not by its id: ids name the file and line, so the choice would change with a
source moved, renamed or compressed.

About ``fraction`` of each domain's documents are held out, not exactly: a small domain
may hold out none. A domain whose every kept document fell in the share trains on them
all instead (it would have nothing to train on; see ``prepare._write_kept``).
"""
from __future__ import annotations

import hashlib
from typing import Iterator

from dsv3.data.document import Document
from dsv3.validate import number, whole_number

HELDOUT_KEY = "heldout"  # metadata flag of a held-out document
GROUP_KEY = "group"
DEFAULT_FRACTION = 0.05


def is_held_out(doc: Document) -> bool:
    return bool(doc.metadata.get(HELDOUT_KEY))


class HeldOutChooser:
    """Flags the held-out share of documents (``metadata["heldout"] = True``)."""

    def __init__(self, fraction: float = DEFAULT_FRACTION, seed: int = 0) -> None:
        # all held out would leave nothing to train on
        number("heldout.fraction", fraction, 0, 1, high_open=True)
        whole_number("heldout.seed", seed, 0)
        self.fraction, self.seed = float(fraction), int(seed)

    def held_out(self, doc: Document) -> bool:
        group = doc.metadata.get(GROUP_KEY)
        h = hashlib.blake2b(f"{self.seed}\0".encode(), digest_size=8)
        if group is not None:
            h.update(b"group\0" + str(group).encode("utf-8", "surrogatepass"))
        else:
            h.update(b"text\0" + doc.text.encode("utf-8", "surrogatepass"))
        return int.from_bytes(h.digest(), "big") / 2**64 < self.fraction

    def mark(self, docs: Iterator[Document]) -> Iterator[Document]:
        """``docs`` in order, each held-out one flagged. A flag the source gave is not
        trusted either way: the choice is this one's alone."""
        for doc in docs:
            doc.metadata.pop(HELDOUT_KEY, None)
            if self.held_out(doc):
                doc.metadata[HELDOUT_KEY] = True
            yield doc

    def to_dict(self) -> dict:
        return {"fraction": self.fraction, "seed": self.seed}
