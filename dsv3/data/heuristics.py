"""Heuristic quality rules (Gopher, C4 and FineWeb style) for English and Chinese only:
a document in another language is judged by the English rules and mostly dropped.

The rules are those the three published pipelines describe (length, word length,
symbol ratios, bullet/ellipsis lines, stop words, line/paragraph/n-gram repetition,
terminal punctuation, short lines, lorem ipsum, curly braces); thresholds are the
published defaults, all in one dataclass so a config can change any of them. One
deliberate difference: FineWeb's two line rules count the non-blank lines, where
FineWeb counts blank ones too (see check). All
rules read one shared :class:`~dsv3.data.textview.TextView` per document.

Chinese differs where a rule counts words: a CJK ideograph counts as one word, the
mean-word-length rule does not apply, and the stop words and terminal punctuation
are Chinese ones. The first failing rule (cheapest first) names the drop reason.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, fields

import numpy as np

from dsv3.data.document import Document
from dsv3.data.step import Step
from dsv3.data.textview import TextView, text_view
from dsv3.validate import WrongType, number, of_type, whole_number

_WHITESPACE_TOKEN_RE = re.compile(r"\S+")
_ALPHA_TOKEN_RE = re.compile(r"\S*[^\W\d_]\S*")
EN_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
ZH_STOP_WORDS = frozenset("的了是在和有我不这也就都而及与")
# After NFKC the full-width forms are ASCII; both are listed because rules run on raw text.
TERMINAL_PUNCT = (".", "!", "?", '"', "'", "。", "！", "？", "”", "」", "…", "；", ";", ":", "：")
BULLETS = ("•", "●", "○", "▪", "■", "◦", "-", "*", "·", "–")
ELLIPSES = ("...", "…")
LANG_COUNT = "lang_"  # stats counts key prefix: documents judged per language


@dataclass
class HeuristicRules:
    """Thresholds; a document failing any enabled rule is dropped. ``None`` disables."""

    # Gopher quality
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0      # English only
    max_mean_word_length: float | None = 10.0     # English only
    max_symbol_word_ratio: float | None = 0.1     # '#' per word, and ellipses per word
    max_bullet_line_fraction: float | None = 0.9
    max_ellipsis_line_fraction: float | None = 0.3
    min_alpha_word_fraction: float | None = 0.8
    min_stop_words: int | None = 2
    # Gopher repetition
    max_dup_line_fraction: float | None = 0.3
    max_dup_paragraph_fraction: float | None = 0.3
    max_dup_line_char_fraction: float | None = 0.2
    max_dup_paragraph_char_fraction: float | None = 0.2
    max_top_ngram_char_fraction: dict[int, float] = field(
        default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    max_dup_ngram_char_fraction: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})
    # C4
    drop_lorem_ipsum: bool = True
    drop_curly_bracket: bool = False   # off by default: it drops every code-like page
    # FineWeb
    min_line_punct_fraction: float | None = 0.12
    max_short_line_fraction: float | None = 0.67
    short_line_chars: int = 30
    max_newline_word_ratio: float | None = 0.3
    max_line_char_dup_fraction: float | None = 0.01

    @classmethod
    def from_dict(cls, d: dict) -> "HeuristicRules":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"heuristics: unknown rule(s) {unknown}; known: {sorted(known)}")
        d = dict(d)
        for key in ("max_top_ngram_char_fraction", "max_dup_ngram_char_fraction"):
            if key in d:  # TOML keys are strings
                d[key] = _ngram_table(f"steps.heuristics.{key}", d[key])
        for f in fields(cls):
            if f.name in d and f.name not in ("max_top_ngram_char_fraction",
                                              "max_dup_ngram_char_fraction"):
                _check_rule(f"steps.heuristics.{f.name}", d[f.name], f.type)
        return cls(**d)


def _check_rule(label: str, value, kind: str) -> None:
    """A rule's value of its declared type (a config's "50" or a table where a number
    goes failed on the first document, naming no rule, or with a traceback)."""
    if value is None and "None" in kind:
        return
    if kind.startswith("bool"):
        of_type(label, value, bool)
    elif kind.startswith("int"):
        whole_number(label, value, 0)
    else:
        number(label, value, 0)


def _ngram_table(label: str, table) -> dict[int, float]:
    """{n: limit} from a TOML table (string keys)."""
    if not isinstance(table, dict):
        raise WrongType(f"{label} must be a table of n = limit, got {table!r}")
    out = {}
    for n, limit in table.items():
        try:
            n_int = int(n)
        except (TypeError, ValueError):
            raise ValueError(f"{label}: {n!r} is not an n-gram length") from None
        whole_number(f"{label}.{n}", n_int, 1)
        number(f"{label}.{n}", limit, 0)
        out[n_int] = float(limit)
    return out


def _dup_fraction(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of their characters)."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_n = dup_chars = total_chars = 0
    for item in items:
        total_chars += len(item)
        if item in seen:
            dup_n += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return dup_n / len(items), dup_chars / max(total_chars, 1)


def _top_ngram_char_fraction(view: TextView, n: int, total_chars: int) -> float:
    h = view.ngram_hashes(n)
    if len(h) == 0:
        return 0.0
    uniq, first, counts = np.unique(h, return_index=True, return_counts=True)
    top = int(np.argmax(counts))
    if counts[top] < 2:
        return 0.0
    start = int(first[top])
    return float(counts[top]) * float(view.word_lengths[start:start + n].sum()) / total_chars


def _dup_ngram_char_fraction(view: TextView, n: int, total_chars: int) -> float:
    """Characters of words covered by an n-gram occurring more than once (after its
    first occurrence), over all word characters (Gopher's definition)."""
    h = view.ngram_hashes(n)
    if len(h) == 0:
        return 0.0
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    repeat_start = first[inverse] != np.arange(len(h))
    if not repeat_start.any():
        return 0.0
    delta = np.zeros(len(view.word_ids) + 1, dtype=np.int64)
    starts = np.nonzero(repeat_start)[0]
    delta[starts] += 1  # starts are distinct, so plain indexing adds each once
    delta[starts + n] -= 1
    covered = np.cumsum(delta[:-1]) > 0
    return float(view.word_lengths[covered].sum()) / total_chars


def check(view: TextView, rules: HeuristicRules) -> str | None:
    """The first rule ``view`` fails (its reason), or None. Cheap rules first."""
    r = rules
    words, zh = view.words, view.lang == "zh"
    n_words = len(words)
    if r.min_words is not None and n_words < r.min_words:
        return "gopher_too_few_words"
    if r.max_words is not None and n_words > r.max_words:
        return "gopher_too_many_words"
    text = view.text
    if r.drop_lorem_ipsum and "lorem ipsum" in text.lower():
        return "c4_lorem_ipsum"
    if r.drop_curly_bracket and "{" in text:
        return "c4_curly_bracket"
    total_chars = int(view.word_lengths.sum()) or 1
    if not zh:
        mean = total_chars / max(n_words, 1)
        if r.min_mean_word_length is not None and mean < r.min_mean_word_length:
            return "gopher_short_mean_word_length"
        if r.max_mean_word_length is not None and mean > r.max_mean_word_length:
            return "gopher_long_mean_word_length"
    if r.max_symbol_word_ratio is not None:
        # each symbol against the limit on its own, as Gopher states it ("for either the
        # hash symbol or the ellipsis"): their sum dropped documents under it for both
        hashes, ellipses = text.count("#"), text.count("...") + text.count("…")
        if max(hashes, ellipses) / max(n_words, 1) > r.max_symbol_word_ratio:
            return "gopher_symbol_ratio"
    lines = view.lines
    if lines:
        if (r.max_bullet_line_fraction is not None and
                sum(line.startswith(BULLETS) for line in lines) / len(lines)
                > r.max_bullet_line_fraction):
            return "gopher_bullet_lines"
        if (r.max_ellipsis_line_fraction is not None and
                sum(line.endswith(ELLIPSES) for line in lines) / len(lines)
                > r.max_ellipsis_line_fraction):
            return "gopher_ellipsis_lines"
    if r.min_alpha_word_fraction is not None and n_words:
        # Gopher counts whitespace-separated words holding a letter ("x)" does, "42" and
        # "--" do not); the shared word list holds letter/digit runs only, so this rule
        # alone splits on whitespace (two C-level passes, no Python loop)
        n_tokens = len(_WHITESPACE_TOKEN_RE.findall(text))
        if n_tokens and len(_ALPHA_TOKEN_RE.findall(text)) / n_tokens < r.min_alpha_word_fraction:
            return "gopher_alpha_words"
    if r.min_stop_words is not None:
        # distinct stop words, as in Gopher ("at least two of the following words")
        stops = ZH_STOP_WORDS if zh else EN_STOP_WORDS
        found: set[str] = set()
        for w in words:
            w = w if zh else w.lower()
            if w in stops:
                found.add(w)
                if len(found) >= r.min_stop_words:
                    break
        if len(found) < r.min_stop_words:
            return "gopher_stop_words"
    if lines:
        # FineWeb's comparisons (at the threshold drops); over the non-blank lines,
        # where FineWeb counts blank ones too: text whose paragraphs are set apart by
        # a blank line would be judged twice as harshly as the same text without
        if (r.min_line_punct_fraction is not None and
                sum(line.endswith(TERMINAL_PUNCT) for line in lines) / len(lines)
                <= r.min_line_punct_fraction):
            return "fineweb_line_punctuation"
        if (r.max_short_line_fraction is not None and
                sum(len(line) <= r.short_line_chars for line in lines) / len(lines)
                >= r.max_short_line_fraction):
            return "fineweb_short_lines"
    if (r.max_newline_word_ratio is not None
            and text.count("\n") / max(n_words, 1) > r.max_newline_word_ratio):
        return "fineweb_list_ratio"
    dup_lines, dup_line_chars = _dup_fraction(lines)
    if r.max_dup_line_fraction is not None and dup_lines > r.max_dup_line_fraction:
        return "gopher_dup_lines"
    if r.max_dup_line_char_fraction is not None and dup_line_chars > r.max_dup_line_char_fraction:
        return "gopher_dup_line_chars"
    if r.max_line_char_dup_fraction is not None and lines:
        # FineWeb's variant: duplicated-line characters over all non-newline characters
        ratio = dup_line_chars * sum(map(len, lines)) / max(len(text) - text.count("\n"), 1)
        if ratio > r.max_line_char_dup_fraction:
            return "fineweb_char_dup"
    dup_paras, dup_para_chars = _dup_fraction(view.paragraphs)
    if r.max_dup_paragraph_fraction is not None and dup_paras > r.max_dup_paragraph_fraction:
        return "gopher_dup_paragraphs"
    if (r.max_dup_paragraph_char_fraction is not None
            and dup_para_chars > r.max_dup_paragraph_char_fraction):
        return "gopher_dup_paragraph_chars"
    for n, limit in sorted(r.max_top_ngram_char_fraction.items()):
        if _top_ngram_char_fraction(view, n, total_chars) > limit:
            return f"gopher_top_{n}gram"
    for n, limit in sorted(r.max_dup_ngram_char_fraction.items()):
        if _dup_ngram_char_fraction(view, n, total_chars) > limit:
            return f"gopher_dup_{n}gram"
    return None


class HeuristicFilter(Step):
    """Drops documents failing a :class:`HeuristicRules` rule; records the language.

    The language is only which rule set judged the document: "zh" when CJK ideographs
    make up most of its letters, else "en". Text in any other language is "en" and
    judged by the English rules, which most of it fails (German and Russian on the
    stop words, Japanese on the mean word length): limit the step with ``domains``
    for such text. The counts go to the step's stats (``lang_en``, ``lang_zh``), so
    stats.json shows which rules judged how many documents."""

    name = "heuristics"

    def __init__(self, rules: HeuristicRules | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if rules is not None and not isinstance(rules, HeuristicRules):
            raise TypeError(f"rules must be a HeuristicRules, got {type(rules).__name__}")
        self.rules = rules or HeuristicRules()

    @property
    def languages(self) -> Counter[str]:
        """Documents judged per language, from the step's counts: a counter of its own
        never reached stats.json, and stayed empty where workers ran the step."""
        return Counter({key[len(LANG_COUNT):]: n for key, n in self.stats.counts.items()
                        if key.startswith(LANG_COUNT)})

    def apply(self, doc: Document) -> Document | str:
        view = text_view(doc)
        doc.metadata["lang"] = view.lang
        # in the step's counts, which the scale-out backends carry back to the driver
        self.stats.counts[LANG_COUNT + view.lang] += 1
        return check(view, self.rules) or doc
