"""Context perturbation: on a fraction of sentences, a synonym swap or a meaning-
preserving restructuring, in English and Chinese; augmented documents are flagged.

Which sentences are touched is decided by a seeded hash of (document id, sentence
index) against ``rate`` (default 0.15), so the choice is reproducible and independent
of processing order or sharding. A chosen sentence is restructured when a rule
matches (English: "Because X, Y." <-> "Y because X.", "If X, Y." -> "Y if X.";
Chinese: 因为X，所以Y。 -> 之所以Y，是因为X。, 虽然X，但是Y。 -> 尽管X，Y。), otherwise
one of its words with a known synonym is swapped; a chosen sentence with neither stays
as it is. The rules leave alone what moving would change the meaning of: questions,
clauses of one word or of two without a pronoun subject ("If so", "because of you"),
a reason that is denied or narrowed ("not because", "only because"), and sentences
past a few hundred characters. The realized rate (sentences changed / sentences
seen) is therefore at most ``rate`` and is reported in the step's counts, not
assumed. Held-out documents (dsv3.data.heldout) are left as they are: the evaluation
scores them as written.

Synonyms come from an offline :class:`Lexicon`: a user-supplied TSV file
(``word<TAB>syn1,syn2``; the way to bring a Chinese thesaurus), or neighbours learned
from the corpus itself (:meth:`Lexicon.learn`): words whose PPMI co-occurrence vectors
are close. Distributional neighbours include antonyms and co-hyponyms ("increase"/
"decrease", "Monday"/"Friday"), so learned swaps preserve the register and syntax of a
sentence more reliably than its exact meaning; that is the price of needing no download.
Prefix-swapped antonyms (mutable/immutable, encode/decode) are filtered; others are not,
so the learned lexicon is opt-in (``lexicon = "learned"``), and by default only the
restructuring rules and a user lexicon perturb text.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import Iterable

import numpy as np

from dsv3.data.document import Document
from dsv3.data.heldout import is_held_out
from dsv3.data.step import Step
from dsv3.validate import number, whole_number

_SENTENCE_SPLIT = re.compile(r"((?<=[.!?])\s+|(?<=[。！？]))")
_WORD = re.compile(r"[A-Za-z]+")
_EN_STOP = frozenset("the a an and or but of to in on at by for with from as is are was were be "
                     "been being it its this that these those not no if then than so such can "
                     "may will would should could do does did has have had which who whom what "
                     "when where why how all any each some more most other into out over".split())


class Lexicon:
    """word -> synonyms (keys lowercase for English)."""

    def __init__(self, synonyms: dict[str, list[str]]) -> None:
        self.synonyms = {k: [s for s in v if s != k] for k, v in synonyms.items() if v}
        self.synonyms = {k: v for k, v in self.synonyms.items() if v}
        # Chinese has no spaces: its entries are found as substrings, longest first
        zh = sorted((k for k in self.synonyms if re.search(r"[\u4e00-\u9fff]", k)),
                    key=len, reverse=True)
        self.zh_pattern = re.compile("|".join(map(re.escape, zh))) if zh else None

    def __len__(self) -> int:
        return len(self.synonyms)

    @classmethod
    def from_tsv(cls, path: str) -> "Lexicon":
        table: dict[str, list[str]] = {}
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip() or line.startswith("#"):
                    continue
                if "\t" not in line:
                    raise ValueError(f"{path}, line {n}: expected 'word<TAB>syn1,syn2'")
                word, syns = line.rstrip("\n").split("\t", 1)
                table[word.strip().lower()] = [s.strip() for s in syns.split(",") if s.strip()]
        return cls(table)

    @classmethod
    def learn(cls, texts: Iterable[str], min_count: int = 5, max_vocab: int = 3000,
              window: int = 2, dim: int = 64, min_cosine: float = 0.7, top_k: int = 3,
              seed: int = 0) -> "Lexicon":
        """Neighbours in a PPMI + truncated-SVD space of English words (3+ letters, not
        stop words). Pairs sharing their first four letters (inflections: function /
        functions) or differing in their last two (a crude part-of-speech guard:
        -ed / -ly / -ing) are not taken as synonyms."""
        import torch
        sentences = [[w.lower() for w in re.findall(r"[A-Za-z]+", t)] for t in texts]
        freq = Counter(w for s in sentences for w in s)
        vocab = [w for w, c in freq.most_common() if c >= min_count and len(w) >= 3
                 and w not in _EN_STOP][:max_vocab]
        if len(vocab) < 3:
            return cls({})
        index = {w: i for i, w in enumerate(vocab)}
        co = np.zeros((len(vocab), len(vocab)), dtype=np.float32)
        for s in sentences:
            ids = [index.get(w, -1) for w in s]
            for i, a in enumerate(ids):
                if a < 0:
                    continue
                for b in ids[max(0, i - window):i]:
                    if b >= 0 and b != a:
                        co[a, b] += 1
                        co[b, a] += 1
        total = co.sum()
        row = co.sum(1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            pmi = np.log(co * total / (row * row.T))
        ppmi = torch.from_numpy(np.nan_to_num(np.maximum(pmi, 0), posinf=0.0))
        torch.manual_seed(seed)
        u, s, _ = torch.svd_lowrank(ppmi, q=min(dim, len(vocab) - 1))
        vec = torch.nn.functional.normalize(u * s.sqrt(), dim=1)
        sim = vec @ vec.T
        sim.fill_diagonal_(-1)
        best = sim.topk(min(top_k, len(vocab) - 1), dim=1)
        table = {}
        for i, w in enumerate(vocab):
            syns = [vocab[j] for score, j in zip(best.values[i].tolist(), best.indices[i].tolist())
                    if score >= min_cosine and vocab[j][:4] != w[:4] and vocab[j][-2:] == w[-2:]
                    and not _negation_pair(w, vocab[j])]
            if syns:
                table[w] = syns
        return cls(table)


_NEGATING_PREFIXES = ("un", "in", "im", "il", "ir", "non", "dis", "de", "en", "anti")


def _negation_pair(a: str, b: str) -> bool:
    """mutable/immutable, locked/unlocked, encode/decode: the commonest antonyms a
    distributional model offers as neighbours are one word with a prefix swapped."""
    for x, y in ((a, b), (b, a)):
        for p in _NEGATING_PREFIXES:
            if x.startswith(p) and (x[len(p):] == y or any(
                    y.startswith(q) and x[len(p):] == y[len(q):] for q in _NEGATING_PREFIXES)):
                return True
    return False


def _cap_like(word: str, model: str) -> str:
    return word[:1].upper() + word[1:] if model[:1].isupper() else word


_LOWERABLE = _EN_STOP | frozenset("we you they he she there our your their his her my one".split())


def _lower_first(s: str) -> str:
    """Lowercase a clause's first letter when it moves mid-sentence, only if its first
    word is a common function word: a name ("Python", "Unicode") must keep its capital,
    and telling names apart needs more than a regex."""
    first = s.split(" ", 1)[0]
    return s[0].lower() + s[1:] if first.lower() in _LOWERABLE else s


def _upper_first(s: str) -> str:
    return s[:1].upper() + s[1:]


_SUBJECT_PRONOUNS = frozenset("i you we they he she it this that there".split())


def _too_short(clause: str) -> bool:
    """A clause that moves must be a clause: one word ("If so", "If not", "If
    anything") or two without a pronoun subject ("If nothing else", "because of
    you") is an idiom or a fragment whose sense is tied to where it stands; two
    words with one ("it rains", "you like") are a subject and its verb."""
    words = clause.split()
    return len(words) < 2 or (len(words) == 2 and words[0].lower() not in _SUBJECT_PRONOUNS)


# Words that, just before "because", belong to the because-clause and not to what
# precedes it: "not because X" denies the reason, "only because X" narrows it, and
# neither survives being left behind at the end ("Because X, this is not.").
_BECAUSE_MODIFIERS = frozenset("not never only just partly mainly largely simply merely "
                               "solely precisely exactly mostly purely chiefly primarily "
                               "probably perhaps maybe likely".split())


def _because_first(m: re.Match) -> str | None:
    reason, rest, end = m.groups()
    if _too_short(reason):
        return None
    return f"{_upper_first(rest)} because {_lower_first(reason)}{end}"


def _because_last(m: re.Match) -> str | None:
    rest, reason, end = m.groups()
    if _too_short(reason) or rest.rsplit(" ", 1)[-1].lower() in _BECAUSE_MODIFIERS:
        return None
    return f"Because {_lower_first(reason)}, {_lower_first(rest)}{end}"


def _if_last(m: re.Match) -> str | None:
    condition, rest, end = m.groups()
    if _too_short(condition):
        return None
    if rest.lower().startswith("then "):  # "If X, then Y." -> "Y if X.", not "Then Y if X."
        rest = rest[len("then "):]
    return f"{_upper_first(rest)} if {_lower_first(condition)}{end}"


# Statements only ("." or "!"): a question's clauses do not move ("If so, why?" is
# not "Why if so?", 因为X，所以Y吗？ would put its 吗 mid-sentence). "Since" is not a
# cue: it is temporal as often as causal ("Since 2010, prices have risen.").
_EN_RULES = [
    (re.compile(r"^Because ([^,]+), ([^,]+?)([.!])$"), _because_first),
    (re.compile(r"^([^,]+?) because ([^,]+?)([.!])$"), _because_last),
    (re.compile(r"^If ([^,]+), ([^,]+?)([.!])$"), _if_last),
]
_ZH_RULES = [
    (re.compile(r"^因为(.+?)，所以(.+?)([。！])$"),
     lambda m: f"之所以{m.group(2)}，是因为{m.group(1)}{m.group(3)}"),
    (re.compile(r"^虽然(.+?)，但是?(.+?)([。！])$"),
     lambda m: f"尽管{m.group(1)}，{m.group(2)}{m.group(3)}"),
]
# The lazy groups make a match attempt quadratic in the sentence's length when it
# fails late ("it broke because " repeated, with no end mark: 19 s at 136 KB). A real
# sentence is well under this; a longer "sentence" is a list, a table or code that
# the splitter did not break, and no rule's reading of it is one to trust.
_MAX_RESTRUCTURE_CHARS = 400


def restructure(sentence: str) -> str | None:
    """The sentence with its clauses reordered, or None where no rule applies (or
    one matches but its clauses would not keep their meaning when moved)."""
    if len(sentence) > _MAX_RESTRUCTURE_CHARS:
        return None
    for pattern, rewrite in _ZH_RULES + _EN_RULES:
        m = pattern.match(sentence)
        if m:
            return rewrite(m)
    return None


class Augmenter(Step):
    """Perturbs ``rate`` of sentences; ``metadata["augmented"]`` flags changed documents."""

    name = "augment"

    def __init__(self, lexicon: Lexicon | None = None, rate: float = 0.15, seed: int = 0,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        number("rate", rate, 0.0, 1.0)
        whole_number("seed", seed)
        if lexicon is not None and not isinstance(lexicon, Lexicon):
            raise TypeError(f"lexicon must be a Lexicon, got {type(lexicon).__name__}")
        self.lexicon, self.rate, self.seed = lexicon or Lexicon({}), rate, seed

    def _draw(self, doc_id: str, i: int) -> tuple[float, int]:
        h = hashlib.blake2b(f"{self.seed}\x00{doc_id}\x00{i}".encode(), digest_size=16).digest()
        return int.from_bytes(h[:8], "big") / 2**64, int.from_bytes(h[8:], "big")

    def _swap(self, sentence: str, pick: int) -> str | None:
        words = [m for m in _WORD.finditer(sentence) if m.group().lower() in self.lexicon.synonyms]
        if self.lexicon.zh_pattern is not None:
            words += list(self.lexicon.zh_pattern.finditer(sentence))
        if not words:
            return None
        m = words[pick % len(words)]
        syns = self.lexicon.synonyms[m.group().lower()]
        new = _cap_like(syns[(pick // len(words)) % len(syns)], m.group())
        return sentence[:m.start()] + new + sentence[m.end():]

    def apply(self, doc: Document) -> Document:
        if is_held_out(doc):  # scored as written, never trained on (dsv3.data.heldout)
            self.stats.counts["heldout_documents_left_as_they_are"] += 1
            return doc
        pieces = _SENTENCE_SPLIT.split(doc.text)
        changed = 0
        for i in range(0, len(pieces), 2):  # even: sentences, odd: separators
            sentence = pieces[i]
            if not sentence.strip():
                continue
            self.stats.counts["sentences"] += 1
            u, pick = self._draw(doc.id, i // 2)
            if u >= self.rate:
                continue
            self.stats.counts["sentences_chosen"] += 1
            new = restructure(sentence)
            how = "restructure"
            if new is None:
                new, how = self._swap(sentence, pick), "synonym"
            if new is not None and new != sentence:
                pieces[i] = new
                changed += 1
                self.modified(f"sentences_{how}")
        doc.metadata["augmented"] = changed > 0
        if changed:
            doc.text = "".join(pieces)
            doc.metadata["augmented_sentences"] = changed
            self.stats.counts["documents_augmented"] += 1
        return doc

    @property
    def realized_rate(self) -> float:
        changed = sum(self.stats.modified.values())
        return changed / max(self.stats.counts["sentences"], 1)
