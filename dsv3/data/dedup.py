"""Exact and near-duplicate removal; the first occurrence of each document is kept.

Exact: a 128-bit BLAKE2b digest of the text after NFKC, lowercasing and collapsing
whitespace, so copies that differ only in spacing or case go too.

Near: MinHash signatures over word n-gram shingles (CJK ideographs count as words,
from the shared :mod:`~dsv3.data.textview` tokenization; a text without words is
shingled by characters, a blank one is not compared) and an LSH index, both from
``datasketch``. A document whose estimated Jaccard similarity to an already-kept
document reaches ``threshold`` is dropped. LSH makes each lookup sublinear: its bands
find the candidates, tuned for recall (datasketch's choice weighted 0.02 : 0.98 against
missed pairs: at 0.8 and 128 permutations, 17 bands of 7 rows find 98% of pairs at the
threshold), and each candidate's estimated Jaccard is then compared with the threshold.
A bucket hit taken as the decision dropped 35% of pairs at 0.75-0.8 and kept about half
of those at 0.8-0.85 (the balanced bands' curve centres near 0.845). What is left is
the estimate's own spread (about 0.035 at 0.8 with 128 permutations) and a small
chance of a pair near the threshold missing every band. The kept documents'
signatures are held, 512 bytes each, for those comparisons.

Both steps are stateful over the whole stream, so they run in one process after the
per-document steps (which are the ones worth spreading over workers).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

from dsv3.data.document import Document
from dsv3.data.step import Step
from dsv3.data.textview import text_view
from dsv3.validate import number, whole_number

_SPACE_RE = re.compile(r"\s+")


def normalized_digest(text: str) -> bytes:
    norm = _SPACE_RE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()
    return hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest()


class ExactDedup(Step):
    name = "exact_dedup"
    stateful = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._seen: set[bytes] = set()

    def apply(self, doc: Document) -> Document | str:
        digest = normalized_digest(doc.text)
        if digest in self._seen:
            return "exact_duplicate"
        self._seen.add(digest)
        return doc


class MinHashDedup(Step):
    """``threshold``: estimated Jaccard similarity at which a document counts as a
    near-duplicate; ``ngram``: words per shingle; ``num_perm``: signature length."""

    name = "minhash_dedup"
    stateful = True

    def __init__(self, threshold: float = 0.8, ngram: int = 5, num_perm: int = 128,
                 seed: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        number("threshold", threshold, 0.0, 1.0, low_open=True, high_open=True)
        whole_number("ngram", ngram, 1)
        whole_number("num_perm", num_perm, 16)
        whole_number("seed", seed, 0)
        from datasketch import MinHash, MinHashLSH
        self._minhash_cls = MinHash
        self.threshold, self.ngram, self.num_perm, self.seed = threshold, ngram, num_perm, seed
        # recall first: each candidate is checked against the threshold below
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.02, 0.98))
        self._kept: dict[str, np.ndarray] = {}  # LSH key -> signature (values < 2**32)
        # one permutation set shared by every signature (datasketch builds it per MinHash
        # otherwise, which dominates the cost for short documents)
        self._template = MinHash(num_perm=num_perm, seed=seed)

    def shingles(self, doc: Document) -> set[bytes]:
        """Word n-grams (the whole text as one when it is shorter). A text without words
        (emoji, math symbols, a rule of dashes) uses n-grams of its non-space characters
        instead: an empty word list would give all such texts one signature. Empty for a
        blank text."""
        units, sep = [w.lower() for w in text_view(doc).words], " "
        if not units:
            units, sep = [c for c in doc.text.lower() if not c.isspace()], ""
        if not units:
            return set()
        n = min(self.ngram, len(units))
        return {sep.join(units[i:i + n]).encode("utf-8") for i in range(len(units) - n + 1)}

    def signature(self, shingles: set[bytes]):
        m = self._minhash_cls(num_perm=self.num_perm, seed=self.seed,
                              permutations=self._template.permutations,
                              scheme=self._template.scheme)
        m.update_batch(sorted(shingles))
        return m

    def apply(self, doc: Document) -> Document | str:
        shingles = self.shingles(doc)
        if not shingles:
            # nothing to compare a blank text by (identical blanks are ExactDedup's)
            self.stats.counts["blank_not_compared"] += 1
            return doc
        sig = self.signature(shingles)
        values = sig.hashvalues.astype(np.uint32)
        if any(np.count_nonzero(self._kept[key] == values) >= self.threshold * len(values)
               for key in self._lsh.query(sig)):
            return "near_duplicate"
        # LSH keys must be unique; prefixing the position keeps them so if ids repeat
        key = f"{self.stats.seen}:{doc.id}"
        self._lsh.insert(key, sig)
        self._kept[key] = values
        return doc
