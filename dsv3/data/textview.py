"""One tokenization per document, shared by every rule that looks at words or lines.

Gopher/C4/FineWeb-style rules all need the same few things (lines, paragraphs,
words, their lengths, word n-gram statistics); computing them once per document and
caching the result on the document is most of what makes the heuristic chain fast.
Word n-grams are handled as integer ids in numpy arrays rather than tuples of
strings, which is what the repetition rules spend their time on.

Words: a run of letters/digits, with the combining marks inside it, is one word (an
Indic vowel sign or virama, a decomposed accent: no word boundary); each CJK ideograph
is one word on its own (Chinese has no spaces, and a character is the unit the Chinese
variants of these rules count in). Words come from the NFC form of the text, so a
decomposed "café" is the same 4-letter word as a precomposed one. Language is "zh" when
CJK ideographs are at least 30% of the letters.
"""
from __future__ import annotations

import re
import unicodedata
from functools import cached_property

import numpy as np

from dsv3.data.document import Document

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# The version of what ``TextView.words`` returns. Hashed quality models are trained on
# these words and save the version with them (dsv3.data.quality), so bump it whenever
# any text's words change. 1: a combining mark ended a word, text taken as given;
# 2: marks stay inside words, and words come from the NFC form.
WORDS_VERSION = 2


def _mark_class() -> str:
    """A character class of the combining marks (categories Mn, Mc, Me), which ``\\w``
    leaves out. They all lie in planes 0, 1 and 14; scanning only those keeps the cost
    at import to a few tens of milliseconds."""
    codes = [c for plane in (0, 1, 14) for c in range(plane << 16, (plane + 1) << 16)
             if unicodedata.category(chr(c))[0] == "M"]
    ranges: list[list[int]] = []
    for c in codes:
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return "".join(f"{chr(a)}-{chr(b)}" for a, b in ranges)


_MARKS = _mark_class()
# letters/digits, then marks each followed by more letters: the common case (no marks)
# is one run and one failed probe for a mark
_WORD_RE = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+(?:[{_MARKS}]+[^\W_{_CJK}]*)*")
_CJK_RE = re.compile(rf"[{_CJK}]")
_PARAGRAPH_SPLIT_RE = re.compile(r"\n\s*\n")
ZH_THRESHOLD = 0.3


class TextView:
    """Lazily computed views of one text; each property is computed at most once."""

    def __init__(self, text: str) -> None:
        self.text = text

    @cached_property
    def words(self) -> list[str]:
        text = self.text
        if not text.isascii():
            text = unicodedata.normalize("NFC", text)  # a no-op check when already NFC
        return _WORD_RE.findall(text)

    @cached_property
    def n_cjk(self) -> int:
        return len(_CJK_RE.findall(self.text)) if not self.text.isascii() else 0

    @cached_property
    def lang(self) -> str:
        letters = sum(len(w) for w in self.words)
        return "zh" if letters and self.n_cjk / letters >= ZH_THRESHOLD else "en"

    @cached_property
    def lines(self) -> list[str]:
        """Non-empty lines, stripped."""
        return [s for s in (line.strip() for line in self.text.split("\n")) if s]

    @cached_property
    def paragraphs(self) -> list[str]:
        return [s for s in (p.strip() for p in _PARAGRAPH_SPLIT_RE.split(self.text)) if s]

    @cached_property
    def word_lengths(self) -> np.ndarray:
        return np.fromiter((len(w) for w in self.words), dtype=np.int64, count=len(self.words))

    @cached_property
    def word_ids(self) -> np.ndarray:
        """Each word's id in a per-document vocabulary (lowercased)."""
        vocab: dict[str, int] = {}
        ids = [vocab.setdefault(w.lower(), len(vocab)) for w in self.words]
        return np.asarray(ids, dtype=np.uint64)

    def ngram_hashes(self, n: int) -> np.ndarray:
        """One 64-bit hash per word n-gram (position i covers words i..i+n-1).

        A polynomial over word ids with a large odd multiplier; collisions only merge
        two n-grams' counts, and at 64 bits they do not happen at document sizes."""
        ids = self.word_ids
        m = len(ids) - n + 1
        if m <= 0:
            return np.empty(0, dtype=np.uint64)
        h = np.zeros(m, dtype=np.uint64)
        mult = np.uint64(0x9E3779B97F4A7C15)
        with np.errstate(over="ignore"):
            for k in range(n):
                h = h * mult + ids[k:k + m] + np.uint64(1)
        return h


def text_view(doc: Document) -> TextView:
    """The cached view of ``doc``'s current text (recomputed if a step changed the text)."""
    view = doc.__dict__.get("_view")
    if view is None or view.text is not doc.text:
        view = TextView(doc.text)
        doc.__dict__["_view"] = view
    return view
