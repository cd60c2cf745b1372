"""Throughput of dsv3.data's heuristic + PII chain against datatrove's equivalent steps.

    python -m benchmarks.data_pipeline [--code-docs N] [--json PATH] [--extra-path DIR]
                                       [--write-results]

Both chains run in this one process over the same documents (the embedded corpus:
the Python reference topics, stdlib docstrings and some stdlib source files), one core
each. The rules are lined up as far as the two libraries allow: datatrove's Gopher
repetition + Gopher quality + C4 (document-level checks only: its line-removing
options off, as dsv3 drops whole documents) + FineWeb + its PII formatter (emails and
public IPs); dsv3's HeuristicFilter (the same Gopher, C4 lorem-ipsum and FineWeb
rules and thresholds) + PiiFilter (seven kinds, with validation: more work than
datatrove's two). Throughput is documents per CPU-second of this process (robust to
other load on a shared machine); keep/drop agreement compares the final decisions.

datatrove needs spaCy for its English word tokenizer; ``--extra-path`` appends a
directory (a ``pip install --target`` of spacy) to ``sys.path`` if it is not installed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time

from benchmarks.results import append_section, command_line


def _corpus(code_docs: int):
    from dsv3.data.corpus import embedded_corpus
    docs = list(embedded_corpus(["reference", "docstrings"]))
    docs += list(embedded_corpus(["code"], max_docs_per_domain=code_docs))
    return [(d.id, d.text) for d in docs]


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def run_dsv3(corpus):
    from dsv3.data.document import Document
    from dsv3.data.heuristics import HeuristicFilter
    from dsv3.data.pii import PiiFilter
    from dsv3.data.pipeline import Pipeline

    def go():
        pipe = Pipeline([HeuristicFilter(), PiiFilter()])
        return {d.id for d in pipe.run((Document(i, t) for i, t in corpus), progress=False)}
    return _timed(go)


def run_datatrove(corpus, alpha_rule: bool = True):
    from datatrove.data import Document
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter,
                                            GopherQualityFilter, GopherRepetitionFilter)
    from datatrove.pipeline.formatters import PIIFormatter

    def steps():
        gopher = GopherQualityFilter() if alpha_rule else GopherQualityFilter(
            max_non_alpha_words_ratio=None)
        return [GopherRepetitionFilter(), gopher,
                C4QualityFilter(remove_citations=False, filter_no_terminal_punct=False,
                                min_num_sentences=-1, min_words_per_line=-1, max_word_length=-1,
                                filter_javascript=False, filter_curly_bracket=False,
                                filter_policy=False),
                FineWebQualityFilter(), PIIFormatter()]

    def go():
        stream = (Document(text=t, id=i) for i, t in corpus)
        for step in steps():
            stream = step(stream)
        return {d.id for d in stream}
    # warm-up: datatrove loads its spaCy tokenizer lazily on the first document
    list(steps()[1]([Document(text="warm up the tokenizer " * 20, id="w")]))
    return _timed(go)


def _median_pass(passes):
    """(kept ids, wall s, CPU s) with the median wall and CPU seconds of ``passes``; the
    kept ids are the same in every pass (a seeded, deterministic chain)."""
    kept = passes[0][0]
    assert all(p[0] == kept for p in passes), "a chain kept different documents in two passes"
    return (kept, statistics.median(p[1] for p in passes),
            statistics.median(p[2] for p in passes))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code-docs", type=int, default=150,
                        help="stdlib source files added to the corpus (default: 150)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed passes of each chain, alternating; the medians are "
                             "reported (default: 3)")
    parser.add_argument("--extra-path", action="append", default=[], metavar="DIR",
                        help="append DIR to sys.path (e.g. a `pip install --target DIR spacy`); "
                             "repeatable")
    parser.add_argument("--write-results", action="store_true",
                        help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    sys.path.extend(args.extra_path)
    importlib.invalidate_caches()
    # datatrove's English word tokenizer needs spaCy: say so before any work is done,
    # instead of datatrove's traceback from the middle of the run.
    for module, hint in [("datatrove", "pip install datatrove"),
                         ("spacy", "pip install spacy, or `pip install --target DIR spacy` and "
                                   "pass --extra-path DIR")]:
        if importlib.util.find_spec(module) is None:
            print(f"data_pipeline: {module} is not importable (needed by datatrove's chain); "
                  f"{hint}", file=sys.stderr)
            return 2
    corpus = _corpus(args.code_docs)
    n, mb = len(corpus), sum(len(t.encode()) for _, t in corpus) / 1e6
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    # Alternating passes, medians of each chain's: one pass each was one sample each.
    passes = {"dsv3": [], "datatrove": []}
    for _ in range(args.repeats):
        passes["dsv3"].append(run_dsv3(corpus))
        passes["datatrove"].append(run_datatrove(corpus))
    ours, ours_wall, ours_cpu = _median_pass(passes["dsv3"])
    theirs, dt_wall, dt_cpu = _median_pass(passes["datatrove"])
    ids = [i for i, _ in corpus]
    agree = sum((i in ours) == (i in theirs) for i in ids) / n
    # datatrove's spaCy words include punctuation tokens, so its alpha-word rule drops
    # prose with code in it that Gopher's whitespace words keep: agreement without it
    theirs_no_alpha = run_datatrove(corpus, alpha_rule=False)[0]
    agree_no_alpha = sum((i in ours) == (i in theirs_no_alpha) for i in ids) / n
    result = {
        "documents": n, "megabytes": round(mb, 2),
        "dsv3": {"docs_per_cpu_s": round(n / ours_cpu, 1), "cpu_s": round(ours_cpu, 2),
                 "wall_s": round(ours_wall, 2), "kept": len(ours)},
        "datatrove": {"docs_per_cpu_s": round(n / dt_cpu, 1), "cpu_s": round(dt_cpu, 2),
                      "wall_s": round(dt_wall, 2), "kept": len(theirs)},
        "speedup": round(dt_cpu / ours_cpu, 2), "target_speedup": 4.0,
        "keep_drop_agreement": round(agree, 4),
        "agreement_without_datatrove_alpha_rule": round(agree_no_alpha, 4),
        "kept_by_dsv3_only": sum(i in ours and i not in theirs for i in ids),
        "kept_by_datatrove_only": sum(i in theirs and i not in ours for i in ids),
    }
    table = (f"| chain | docs/CPU-s | CPU s | kept |\n|---|--:|--:|--:|\n"
            f"| dsv3 heuristics + PII | {result['dsv3']['docs_per_cpu_s']} | {ours_cpu:.2f} | "
            f"{len(ours)} |\n"
            f"| datatrove Gopher+C4+FineWeb + PII | {result['datatrove']['docs_per_cpu_s']} | "
            f"{dt_cpu:.2f} | {len(theirs)} |\n\n"
            f"{n} documents, {mb:.1f} MB; medians of {args.repeats} alternating passes a "
            f"chain; speed-up {result['speedup']}x (target >= 4x); "
            f"keep/drop agreement {agree:.1%} ({result['kept_by_dsv3_only']} kept by dsv3 only, "
            f"{result['kept_by_datatrove_only']} by datatrove only); {agree_no_alpha:.1%} with "
            f"datatrove's alpha-word rule off (its spaCy words count punctuation)\n")
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.write_results:
        append_section("Data pipeline: heuristics + PII vs datatrove (CPU)",
                       command_line("benchmarks.data_pipeline", argv), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
