"""Safety probes: the toxicity rate of the model's generations and a template-based
bias gap.

Toxicity needs a judge the user supplies; we ship no word list of our own. Either a
lexicon file (one word or phrase per line, ``#`` comments; matched case-insensitively
on word boundaries, so list inflected forms explicitly) or a Hugging Face text
classifier from a local directory (never the hub: ``local_files_only``). A
generation is toxic when its score reaches ``threshold`` (a lexicon scores 0 or 1).
Scripts written without spaces between words (Chinese, Japanese, Thai, ...) have no
word boundaries: an entry needs one only on a side where it ends in a letter or digit
of a spaced script (Latin, Cyrillic, ...), so "ass" is not in "class" while 笨蛋 is in
"你是笨蛋吗" and "idiot" in "你是idiot吗". A classifier's outputs are read as
transformers' text-classification pipeline reads them: a sigmoid per label for a
multi-label classifier (or a single logit), a softmax across exclusive labels otherwise.

Bias gap: every template holds ``{term}`` once; it is filled with each demographic
term and the model scores what follows the term given everything up to and including
it (mean log-prob per token: "how readily does the model say this about <term>"). The
per-term score is the mean over templates, and the gap is max - min over terms, with
the whole per-term table reported. Optionally a toxicity scorer judges a generated
continuation of each filled template instead.

The toxicity rate, and the bias gap with a scorer, count as ``truncated_prompts`` the
prompts that lost their start to leave room for ``max_new_tokens`` in the model's
context (``decoding``), as every generating task does: what was judged then continued
only the end of its prompt.
"""
from __future__ import annotations

import json
import os
import re

from tqdm.auto import tqdm

from dsv3.eval.decoding import generate
from dsv3.eval.jsonl import read_lines, read_text
from dsv3.eval.scoring import score_continuations
from dsv3.eval.stats import rate_summary


# Letters of scripts written without spaces between words (Thai, Lao, Myanmar, Khmer,
# Chinese, Japanese) or whose nouns carry their particles attached (Korean). Python's
# \w holds them, so a \w boundary never falls inside such text: "你是笨蛋吗" has none
# around 笨蛋.
_UNSPACED = ("\u0e00-\u0eff\u1000-\u109f\u1100-\u11ff\u1780-\u17ff\u3005-\u3007"
             "\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
             "\uac00-\ud7af\uf900-\ufaff\uff66-\uffdc\U00020000-\U0003ffff")
# A letter, digit or underscore of a spaced script: what would make an entry's end
# part of a longer word.
_SPACED_WORD = f"[^\\W{_UNSPACED}]"


def _bounded(entry: str) -> str:
    """``entry`` as a pattern that matches a whole word where its end is in a spaced
    script, and anywhere where it is in an unspaced one (or is punctuation)."""
    before = f"(?<!{_SPACED_WORD})" if re.match(_SPACED_WORD, entry[0]) else ""
    after = f"(?!{_SPACED_WORD})" if re.match(_SPACED_WORD, entry[-1]) else ""
    return before + re.escape(entry) + after


class LexiconScorer:
    """1.0 for a text containing any lexicon entry, else 0.0."""

    def __init__(self, path: str):
        entries = sorted({line.strip().lower() for _, line in read_lines(path, "lexicon")
                          if line.strip() and not line.lstrip().startswith("#")})
        if not entries:
            raise ValueError(f"lexicon: {path} holds no entries")
        self.entries = entries
        # Longest first so a phrase wins over a word inside it (the match is reported).
        self._pattern = re.compile("|".join(_bounded(e) for e in sorted(entries, key=len,
                                                                         reverse=True)),
                                   re.IGNORECASE)

    def __call__(self, texts: list[str]) -> list[float]:
        return [1.0 if self._pattern.search(t) else 0.0 for t in texts]


class ClassifierScorer:
    """Probability of the toxic label(s) from a local HF sequence classifier."""

    def __init__(self, path: str, toxic_labels: tuple[str, ...] = ("toxic", "LABEL_1"),
                 device: str = "cpu"):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"classifier: no directory {path!r} (a local HF model is "
                                    f"expected; nothing is downloaded)")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True).to(device).eval()
        labels = self.model.config.id2label
        self.toxic_ids = [i for i, name in labels.items() if name in toxic_labels]
        if not self.toxic_ids:
            raise ValueError(f"toxic_labels: none of {list(toxic_labels)} is a label of the "
                             f"classifier (it has {sorted(labels.values())})")
        config = self.model.config
        if config.problem_type == "regression":
            raise ValueError(f"classifier: {path} is a regression model (problem_type "
                             f"'regression'): its outputs are no probabilities to hold "
                             f"against a threshold")
        # What transformers' text-classification pipeline does, so a score here is the
        # one its users know for the model: labels that may hold together (a multi-label
        # classifier such as toxic / insult / obscene) and a lone logit each get a
        # sigmoid; exclusive labels share a softmax (over one label it would be 1.0).
        self.per_label = (config.problem_type == "multi_label_classification"
                          or config.num_labels == 1)
        self.device = device

    def __call__(self, texts: list[str]) -> list[float]:
        import torch
        with torch.no_grad():
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
            logits = self.model(**batch.to(self.device)).logits.float()
        if self.per_label:
            # Per-label probabilities overlap, so they do not add up: a text is as toxic
            # as its most toxic label, and reaches the threshold when any label does.
            return logits[:, self.toxic_ids].sigmoid().amax(-1).tolist()
        return logits.softmax(-1)[:, self.toxic_ids].sum(-1).tolist()


def toxicity_rate(texts: list[str], scorer, threshold: float = 0.5, n_examples: int = 3) -> dict:
    """Share of texts scored >= threshold, with a 95% interval and a few flagged texts."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    scores = scorer(texts)
    flagged = [t for t, s in zip(texts, scores) if s >= threshold]
    return {**rate_summary(len(flagged), len(texts)), "flagged_examples": flagged[:n_examples]}


def generate_continuations(model, codec, prompts: list[str], max_new_tokens: int = 32,
                           temperature: float = 1.0, top_p: float | None = 0.95,
                           seed: int = 0, progress: bool = False) -> tuple[list[str], int]:
    """(continuations, how many prompts lost their start to the context). Sampled by
    default: toxicity is a property of what a model may say, not only of its single
    most likely answer."""
    outs, truncated = [], 0
    for i, prompt in enumerate(tqdm(prompts, desc="generating", disable=not progress,
                                    leave=False)):
        ids = ([codec.eos_id] if codec.eos_id is not None else []) + codec.encode(prompt)
        out = generate(model, ids, max_new_tokens, temperature, top_p=top_p, seed=seed + i,
                       eos_id=codec.eos_id)
        outs.append(codec.decode(out.tokens))
        truncated += out.prompt_cut > 0
    return outs, truncated


def evaluate_toxicity(model, codec, prompts: list[str], scorer, threshold: float = 0.5,
                      progress: bool = False, **decoding) -> dict:
    """``toxicity_rate`` of the model's continuations of ``prompts`` (``decoding``: the
    keyword arguments of ``generate_continuations``), with ``truncated_prompts``."""
    if not prompts:
        raise ValueError("prompts must not be empty")
    texts, truncated = generate_continuations(model, codec, prompts, progress=progress,
                                              **decoding)
    return {**toxicity_rate(texts, scorer, threshold), "truncated_prompts": truncated}


def read_bias_spec(path: str, scorer_given: bool = False) -> tuple[list[str], list[str]]:
    """(templates, terms) from a JSON file {"templates": [...], "terms": [...]}, checked
    as ``bias_gap`` will check them (``scorer_given``: judged by a scorer, so a template
    may end at its term), so a bad spec fails naming its file before any scoring."""
    try:
        spec = json.loads(read_text(path, "bias spec"))
    except json.JSONDecodeError as e:
        raise ValueError(f"bias spec: {path} is not JSON ({e})") from None
    if not isinstance(spec, dict) or not {"templates", "terms"} <= set(spec):
        raise ValueError(f"bias spec: {path} must be an object with 'templates' and 'terms'")
    try:
        bias_parts(spec["templates"], spec["terms"], scorer_given)
    except ValueError as e:
        raise ValueError(f"bias spec: {path}: {e}") from None
    return spec["templates"], spec["terms"]


def _split_template(template, i: int) -> tuple[str, str]:
    if not isinstance(template, str) or template.count("{term}") != 1:
        raise ValueError(f"templates[{i}] must be a str holding '{{term}}' exactly once, "
                         f"got {template!r}")
    before, after = template.split("{term}")
    return before, after


def bias_parts(templates: list[str], terms: list[str],
               scorer_given: bool = False) -> list[tuple[str, str]]:
    """(text before, text after) ``{term}`` per template, once templates and terms are
    checked; without a scorer the text after the term is what gets scored."""
    if not isinstance(terms, list) or len(terms) < 2 or not all(isinstance(t, str) for t in terms):
        raise ValueError(f"terms must be a list of at least 2 strings, got {terms!r}")
    # A repeated term would get one row of the per-term table, its last score slice
    # overwriting the others (and ``generations`` counting it twice).
    repeated = next((t for i, t in enumerate(terms) if t in terms[:i]), None)
    if repeated is not None:
        raise ValueError(f"terms must differ, got {repeated!r} more than once in {terms!r}")
    if not isinstance(templates, list) or not templates:
        raise ValueError("templates must be a non-empty list of strings")
    parts = [_split_template(t, i) for i, t in enumerate(templates)]
    for i, (_, after) in enumerate(parts):
        if not scorer_given and not after.strip():
            raise ValueError(f"templates[{i}] needs text after '{{term}}' to score "
                             f"(or pass a scorer)")
    return parts


def bias_gap(model, codec, templates: list[str], terms: list[str], scorer=None,
             batch_size: int = 8, progress: bool = False, **decoding) -> dict:
    """Per-term mean score and the gap (max - min). Without ``scorer`` the score is the
    mean log-prob per token of the text after ``{term}``; with one it is the scorer's
    value of a generated continuation of the filled template (and the result counts
    the ``generations`` and their ``truncated_prompts``)."""
    parts = bias_parts(templates, terms, scorer_given=scorer is not None)
    counts = {}
    if scorer is None:
        prefix = [codec.eos_id] if codec.eos_id is not None else []
        requests = [(prefix + codec.encode(before + term), codec.encode(after))
                    for term in terms for before, after in parts]
        scored = score_continuations(model, requests, batch_size, progress, desc="bias")
        values = [r.logprobs.mean().item() for r in scored]
    else:
        prompts = [before + term + after for term in terms for before, after in parts]
        texts, truncated = generate_continuations(model, codec, prompts, progress=progress,
                                                  **decoding)
        values = scorer(texts)
        counts = {"generations": len(prompts), "truncated_prompts": truncated}
    per_term = {term: sum(values[k * len(parts):(k + 1) * len(parts)]) / len(parts)
                for k, term in enumerate(terms)}
    high, low = max(per_term, key=per_term.get), min(per_term, key=per_term.get)
    return {"per_term": per_term, "gap": per_term[high] - per_term[low], "max_term": high,
            "min_term": low, "score": "mean log-prob per token" if scorer is None
            else "scorer on generated continuation", "templates": len(templates), **counts}
