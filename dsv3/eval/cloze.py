"""Cloze-style multiple choice built from any (domain, text) documents: show a
passage, ask which continuation really follows it. The true next words compete with
distractor spans of the same length cut from elsewhere, and the level sets how hard
telling them apart is:

| level | choices | context words | answer words | distractors from |
|---|---|---|---|---|
| 1 | 2 | 48 | 8 | another domain (any other document when no other domain's is long enough) |
| 2 | 4 | 32 | 8 | other documents, any domain |
| 3 | 4 | 16 | 6 | the same document (same topic and style: only real continuation skill helps) |

Spans keep the document's own whitespace. Items are drawn with ``random.Random`` from
the seed and level, so the same documents and seed give the same items.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from dsv3.eval.multiple_choice import MCItem

CLOZE_TEMPLATE = "{question}"  # the passage itself is the prompt; choices follow a space


@dataclass(frozen=True)
class ClozeLevel:
    n_choices: int
    context_words: int
    answer_words: int
    distractors: str  # "other-domain", "other-document" or "same-document"


LEVELS = {1: ClozeLevel(2, 48, 8, "other-domain"), 2: ClozeLevel(4, 32, 8, "other-document"),
          3: ClozeLevel(4, 16, 6, "same-document")}


class _Doc:
    def __init__(self, domain: str, text: str):
        self.domain, self.text = domain, text
        self.words = [m.span() for m in re.finditer(r"\S+", text)]  # (start, end) per word

    def span(self, first: int, count: int) -> str:
        return self.text[self.words[first][0]:self.words[first + count - 1][1]]


def _distractor_pool(doc: _Doc, docs: list[_Doc], kind: str, words: int) -> list[_Doc]:
    """The documents a distractor of ``words`` words can be cut from. Too short ones
    go before the other-domain fallback: another domain whose documents are all short
    must not leave the pool empty while this domain has long ones."""
    if kind == "same-document":
        return [doc]
    others = [d for d in docs if d is not doc and len(d.words) >= words]
    if kind == "other-domain":
        return [d for d in others if d.domain != doc.domain] or others
    return others


def cloze_items(documents: list[tuple[str, str]], level: int, n_items: int = 40,
                seed: int = 0) -> list[MCItem]:
    """Up to ``n_items`` cloze items at ``level`` (fewer when the documents run out)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level!r}")
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 1:
        raise ValueError(f"n_items must be a positive int, got {n_items!r}")
    spec = LEVELS[level]
    docs = [_Doc(domain, text) for domain, text in documents]
    need = spec.context_words + spec.answer_words
    usable = [d for d in docs if len(d.words) >= need]
    if not usable or len(docs) < 2 and spec.distractors != "same-document":
        raise ValueError(f"documents: level {level} needs texts of at least {need} words and, "
                         f"for distractors, at least 2 documents")
    rng = random.Random(f"cloze:{seed}:{level}")
    items, seen, attempts = [], set(), 0
    while len(items) < n_items and attempts < 20 * n_items:
        attempts += 1
        doc = rng.choice(usable)
        start = rng.randrange(len(doc.words) - need + 1)
        answer_at = start + spec.context_words
        if (id(doc), start) in seen:
            continue
        truth = doc.span(answer_at, spec.answer_words)
        choices = {truth}
        pool = _distractor_pool(doc, docs, spec.distractors, spec.answer_words)
        for _ in range(20 * spec.n_choices):
            if len(choices) == spec.n_choices or not pool:
                break
            other = rng.choice(pool)
            at = rng.randrange(len(other.words) - spec.answer_words + 1)
            # In the same document, keep clear of the true answer's own words.
            if other is doc and abs(at - answer_at) < spec.answer_words:
                continue
            choices.add(other.span(at, spec.answer_words))
        if len(choices) < spec.n_choices:
            continue
        seen.add((id(doc), start))
        ordered = sorted(choices - {truth})
        rng.shuffle(ordered)
        answer = rng.randrange(spec.n_choices)
        ordered.insert(answer, truth)
        items.append(MCItem(doc.span(start, spec.context_words), tuple(ordered), answer, level))
    return items
