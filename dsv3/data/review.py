"""Human spot-check: a seeded, stratified sample of each step's decisions, a static
page to judge them, and precision estimates from the verdicts.

Sampling is bottom-k by a seeded hash of the document id within each stratum
(step, domain, decision): the same documents are picked whatever the processing order
or sharding, so a rerun with the same seed gives the same review file, and a stratum
with fewer documents than k is taken whole. The population of every stratum is
recorded so estimates can weight strata by their true size.

A reviewer answers, for each sampled decision, whether the step was right
("correct" / "wrong"). A step's precision (of its drops) is the share of dropped
documents that deserved it; per stratum it gets a Wilson 95% interval, and over a
step the strata are combined weighted by their populations (stratified estimator,
normal-approximation interval). Verdicts on the quality steps' decisions (heuristics,
quality) also become classifier labels: a document rightly dropped or wrongly kept is
bad (0), the other way round good (1).
"""
from __future__ import annotations

import hashlib
import heapq
import html
import json
import math
import os
from collections import Counter, defaultdict
from typing import Iterator

from dsv3.data.document import Document
from dsv3.data.readers import jsonl_records

VERDICTS = ("correct", "wrong")


def _unique(review_id: str, taken: set[str]) -> str:
    """``review_id``, numbered ("#2", "#3"…) when already taken: verdicts are matched by
    review id, and two documents sharing an id (two sources that both number their
    records from 1) must not share a verdict."""
    unique, k = review_id, 1
    while unique in taken:
        k += 1
        unique = f"{review_id}#{k}"
    taken.add(unique)
    return unique


class ReviewSampler:
    def __init__(self, per_stratum: int = 5, seed: int = 0) -> None:
        if per_stratum < 1:
            raise ValueError(f"per_stratum must be >= 1, got {per_stratum}")
        self.per_stratum, self.seed = per_stratum, seed
        self._heaps: dict[tuple[str, str, str], list] = defaultdict(list)
        self.population: Counter[tuple[str, str, str]] = Counter()

    def _priority(self, step: str, doc_id: str) -> int:
        h = hashlib.blake2b(f"{self.seed}\x00{step}\x00{doc_id}".encode(), digest_size=8)
        return int.from_bytes(h.digest(), "big")

    def offer(self, step: str, decision: str, reason: str | None, doc: Document,
              text_before: str | None = None) -> None:
        key = (step, doc.domain, decision)
        self.population[key] += 1
        # max-heap of the k smallest priorities (negated), holding snapshots: later
        # steps may change the text, the reviewer must see what this step saw
        item = (-self._priority(step, doc.id), doc.id, reason, doc.text, text_before)
        heap = self._heaps[key]
        if len(heap) < self.per_stratum:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)

    def items(self) -> list[dict]:
        out, taken = [], set()
        for (step, domain, decision), heap in sorted(self._heaps.items()):
            for _, doc_id, reason, text, before in sorted(heap, reverse=True):
                review_id = _unique(f"{step}/{domain}/{decision}/{doc_id}", taken)
                out.append({"review_id": review_id, "step": step,
                            "domain": domain, "decision": decision, "reason": reason,
                            "id": doc_id, "text": text, "text_before": before,
                            "verdict": None})
        return out

    def write(self, directory: str) -> dict:
        """review/sample.jsonl (fill in "verdict"), strata.json and index.html."""
        os.makedirs(directory, exist_ok=True)
        items = self.items()
        with open(os.path.join(directory, "sample.jsonl"), "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        strata = [{"step": s, "domain": d, "decision": c, "population": n,
                   "sampled": len(self._heaps[(s, d, c)])}
                  for (s, d, c), n in sorted(self.population.items())]
        with open(os.path.join(directory, "strata.json"), "w") as f:
            json.dump({"seed": self.seed, "per_stratum": self.per_stratum, "strata": strata}, f,
                      indent=2)
        with open(os.path.join(directory, "index.html"), "w", encoding="utf-8") as f:
            f.write(render_html(items))
        return {"items": len(items), "strata": len(strata)}


_PAGE = """<!doctype html><meta charset="utf-8"><title>dsv3 data review</title>
<style>body{{font:14px sans-serif;max-width:60em;margin:auto}}pre{{white-space:pre-wrap;
background:#f6f6f6;padding:.5em;max-height:20em;overflow:auto}}.item{{border-top:1px solid #ccc;
padding:.5em 0}}</style>
<h1>Spot-check review</h1><p>For each decision: was the step right? Then press
<button onclick="save()">download verdicts.jsonl</button> and run
<code>dsv3 data review --sample sample.jsonl --verdicts verdicts.jsonl</code>.</p>
{items}
<script>function save(){{const out=[];document.querySelectorAll('.item').forEach(e=>{{
const c=e.querySelector('input:checked');if(c)out.push(JSON.stringify({{review_id:e.dataset.id,
verdict:c.value}}))}});const a=document.createElement('a');a.href=URL.createObjectURL(
new Blob([out.join('\\n')+'\\n'],{{type:'application/jsonl'}}));a.download='verdicts.jsonl';
a.click()}}</script>"""


def render_html(items: list[dict], max_chars: int = 4000) -> str:
    parts = []
    for i, it in enumerate(items):
        rid = html.escape(it["review_id"], quote=True)
        def cut(t: str) -> str:
            return t if len(t) <= max_chars else t[:max_chars] + " […]"
        before = (f'<p>before this step:</p><pre>{html.escape(cut(it["text_before"]))}</pre>'
                  f'<p>after:</p>' if it.get("text_before") else "")
        radios = "".join(f'<label><input type="radio" name="v{i}" value="{v}"> {v}</label> '
                         for v in VERDICTS)
        parts.append(f'<div class="item" data-id="{rid}"><b>{html.escape(it["step"])}</b> '
                     f'{html.escape(it["decision"])}'
                     f'{" (" + html.escape(it["reason"]) + ")" if it["reason"] else ""} · '
                     f'{html.escape(it["domain"])} · {html.escape(it["id"])}<br>{radios}'
                     f'{before}<pre>{html.escape(cut(it["text"]))}</pre></div>')
    return _PAGE.format(items="\n".join(parts))


_SAMPLE_FIELDS = ("review_id", "step", "domain", "decision", "text")


def _jsonl_objects(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line; a line that is not a JSON object
    stops with the file and its line named (json's own message counts lines within
    the one line it was given, so always says "line 1")."""
    for n, rec, error in jsonl_records(path):
        if error is None and not isinstance(rec, dict):
            error = f"expected a JSON object, got a {type(rec).__name__}"
        if error is not None:
            raise ValueError(f"{path}, line {n}: {error}")
        yield n, rec


def _verdict(value: object, path: str, n: int) -> str | None:
    if value not in (None, *VERDICTS):
        raise ValueError(f"{path}, line {n}: verdict must be one of {list(VERDICTS)} or "
                         f"null, got {value!r}")
    return value  # type: ignore[return-value]


def read_verdicts(sample_path: str, verdicts_path: str | None = None) -> list[dict]:
    """Sample items with their verdicts: from the sample file itself, overridden by a
    separate verdicts file (``{"review_id", "verdict"}`` per line) when given."""
    items, by_id = [], {}
    for n, item in _jsonl_objects(sample_path):
        missing = [k for k in _SAMPLE_FIELDS if k not in item]
        if missing:
            raise ValueError(f"{sample_path}, line {n}: missing field(s) {missing} (expected "
                             f"the review/sample.jsonl that `dsv3 data prepare` writes)")
        if item["review_id"] in by_id:  # its verdicts could not be told apart
            raise ValueError(f"{sample_path}, line {n}: review_id {item['review_id']!r} "
                             f"repeats an earlier line's")
        item["verdict"] = _verdict(item.get("verdict"), sample_path, n)
        items.append(item)
        by_id[item["review_id"]] = item
    if verdicts_path:
        for n, rec in _jsonl_objects(verdicts_path):
            review_id = rec.get("review_id")
            if not isinstance(review_id, str) or review_id not in by_id:
                raise ValueError(f"{verdicts_path}, line {n}: review_id {review_id!r} is not "
                                 f"in {sample_path}")
            by_id[review_id]["verdict"] = _verdict(rec.get("verdict"), verdicts_path, n)
    return items


def read_strata(path: str) -> list[dict]:
    """The strata (with their populations) from the strata.json the sampler wrote."""
    try:
        with open(path, encoding="utf-8") as f:
            strata = json.load(f)["strata"]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, "
                         f"column {e.colno})") from None
    except (KeyError, TypeError):
        raise ValueError(f"{path}: expected an object with a 'strata' list, as "
                         f"`dsv3 data prepare` writes") from None
    fields = ("step", "domain", "decision", "population")
    if not isinstance(strata, list) or not all(
            isinstance(s, dict) and all(k in s for k in fields) for s in strata):
        raise ValueError(f"{path}: 'strata' must be a list of objects with {list(fields)}")
    return strata


def wilson(successes: float, n: float, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def estimate_precision(items: list[dict], strata: list[dict]) -> dict:
    """Per step: precision of its drops, per domain (Wilson) and combined (stratified).
    The combined figure covers the judged domains only: the step's domains whose drops
    got no verdict are listed under ``unjudged_domains`` (with the drops they hold),
    so that a figure over part of a step does not read as the whole step's."""
    population = {(s["step"], s["domain"]): s["population"] for s in strata
                  if s["decision"] == "dropped"}
    judged: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for it in items:
        if it["decision"] == "dropped" and it["verdict"] is not None:
            judged[(it["step"], it["domain"])].append(it["verdict"] == "correct")
    report: dict[str, dict] = {}
    for (step, domain), votes in sorted(judged.items()):
        k, n = sum(votes), len(votes)
        lo, hi = wilson(k, n)
        r = report.setdefault(step, {"domains": {}})
        r["domains"][domain] = {"precision": k / n, "ci95": [lo, hi], "judged": n,
                                "population": population.get((step, domain), n)}
    for step, r in report.items():
        doms = r["domains"].values()
        total = sum(d["population"] for d in doms)
        p = sum(d["population"] * d["precision"] for d in doms) / total
        var = sum((d["population"] / total) ** 2 * d["precision"] * (1 - d["precision"])
                  / d["judged"] for d in doms)
        # Wilson interval at the stratified estimate's effective sample size (where every
        # stratum is unanimous the variance is 0: fall back to the judged count)
        n_eff = p * (1 - p) / var if var > 0 else sum(d["judged"] for d in doms)
        r["precision"] = p
        r["ci95"] = list(wilson(p * n_eff, n_eff))
        r["judged"] = sum(d["judged"] for d in doms)
        unjudged = {domain: dropped for (of, domain), dropped in sorted(population.items())
                    if of == step and dropped > 0 and domain not in r["domains"]}
        if unjudged:
            r["unjudged_domains"] = unjudged
    return report


# The steps whose decisions are about a text's quality. A dedup or PII drop says nothing
# of it: the second copy of a good text is dropped rightly, and labelling that copy bad
# would teach the quality classifier that good text is bad.
QUALITY_STEPS = ("heuristics", "quality")


def verdicts_to_labels(items: list[dict], steps=QUALITY_STEPS) -> list[dict]:
    """Judged items of ``steps`` as classifier training rows: {"text", "label"} (1 =
    good), each text once; a text judged both ways (through two steps) is left out."""
    by_text: dict[str, dict] = {}
    conflicting: set[str] = set()
    for it in items:
        if it["verdict"] is None or it["step"] not in steps:
            continue
        bad = (it["decision"] == "dropped") == (it["verdict"] == "correct")
        row = {"text": it["text"], "label": 0 if bad else 1, "review_id": it["review_id"]}
        first = by_text.setdefault(it["text"], row)
        if first["label"] != row["label"]:
            conflicting.add(it["text"])
    return [row for text, row in by_text.items() if text not in conflicting]
