"""``dsv3 data ...``: prepare the corpus, train the quality classifier, read review verdicts."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading

from dsv3.validate import output_path, whole_number
from dsv3.whole_files import write_text_whole

# Bad values are raised as ValueError/FileNotFoundError naming the option; dsv3.cli
# prints them as one "error:" line and exits with status 2, as argparse does. They are
# checked before any work starts, so a typo costs nothing and leaves no half-made output
# (prepare also stages its outputs: a run that fails later leaves --out as it was).


def _input_file(option: str, path: str) -> None:
    """A bare "[Errno 2] ..." names neither the option nor what was expected."""
    if os.path.isdir(path):
        raise ValueError(f"{option}: {path!r} is a directory, not a file")
    if not os.path.exists(path):  # not isfile: a pipe (--data <(zcat x.gz)) is readable too
        raise FileNotFoundError(f"{option}: no such file {path!r}")


def _serial_num_proc(args: argparse.Namespace, backend: str) -> None:
    """--num-proc above 1 for the serial backend, which runs in this one process, was
    silently ignored: a user who asked for 4 processes got 1 and no word of it. A
    warning, not an error: a script that loops over the backends with one --num-proc
    is fair use."""
    if backend == "serial" and args.num_proc is not None and args.num_proc > 1:
        given = "--backend serial" if args.backend else "[scale] backend = 'serial'"
        print(f"dsv3 data prepare: warning: --num-proc {args.num_proc} is ignored: {given} "
              f"runs in one process (--backend datasets or --backend spark would use "
              f"{args.num_proc})", file=sys.stderr)


class _Terminated(KeyboardInterrupt):
    """A SIGTERM (a scheduler's stop, ``kill``), taken as a Ctrl-C is: killed outright,
    prepare left its stage and its lock for the next run to clear."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While prepare runs, SIGTERM raises _Terminated in the main thread, where Python
    delivers signals, as SIGINT raises KeyboardInterrupt; the old handler comes back."""
    def terminate(signum, frame):
        raise _Terminated()

    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (dsv3.cli.main run from a thread)
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted(out: str, terminated: bool) -> int:
    """Ctrl-C or SIGTERM: one line on what is left instead of a traceback. prepare has
    already removed its stage, or kept it with a journal when the move-in had begun (then
    the next run into ``out`` finishes that move), so the line says which."""
    from dsv3.data.movein import journal_path
    if os.path.lexists(journal_path(out)):
        left = (f"it was moving its outputs into {out!r}: the next `dsv3 data prepare` "
                f"into it finishes that move first")
    else:
        left = f"{out!r} is as it was before this run"
    how = "terminated (SIGTERM)" if terminated else "interrupted"
    print(f"dsv3 data prepare: {how}; {left}", file=sys.stderr)
    # 128 + the signal's number, as a shell reports a command that SIGINT or SIGTERM ended
    return 128 + (signal.SIGTERM if terminated else signal.SIGINT)


def _prepare(args: argparse.Namespace) -> int:
    from dsv3.data.config import load_config
    from dsv3.data.prepare import prepare
    if args.num_proc is not None:
        whole_number("--num-proc", args.num_proc, 1)
    config = load_config(args.config)
    if args.out:
        config["output"]["dir"] = args.out
    output_path("--out" if args.out else "[output] dir", config["output"]["dir"], directory=True)
    if args.backend:
        config["scale"]["backend"] = args.backend
    _serial_num_proc(args, config["scale"]["backend"])
    if args.num_proc is not None:
        config["scale"]["num_proc"] = args.num_proc
    try:
        with _sigterm_as_interrupt():
            stats = prepare(config, progress=not args.no_progress,
                            skip_malformed=args.skip_malformed)
    except KeyboardInterrupt as stopped:
        return _interrupted(config["output"]["dir"], isinstance(stopped, _Terminated))
    summary = {name: {k: s[k] for k in ("seen", "kept", "dropped")}
               for name, s in stats["steps"].items()}
    skipped = _skipped_records(stats["readers"])
    print(json.dumps({"output": config["output"]["dir"], "steps": summary,
                      "skipped_records": skipped,
                      "tokens": {d: m["tokens"] for d, m in stats["tokens"]["domains"].items()},
                      "heldout_documents": stats["heldout"]["documents"]},
                     indent=2))
    return 0


def _skipped_records(readers: list[dict]) -> dict:
    """--skip-malformed's skips per source, also said on stderr: records left out of the
    corpus should not pass unnoticed (stats.json's readers list has the first locations)."""
    skipped = {f"sources[{r['source']}]": r["skipped_by_reason"]
               for r in readers if r["skipped"]}
    if skipped:
        total = sum(sum(by_reason.values()) for by_reason in skipped.values())
        where = "; ".join(f"{source}: " + ", ".join(f"{n} {reason}"
                                                   for reason, n in by_reason.items())
                          for source, by_reason in skipped.items())
        print(f"dsv3 data prepare: warning: skipped {total} malformed record(s) ({where}); "
              f"their locations are in stats.json under readers", file=sys.stderr)
    return skipped


def _train_quality(args: argparse.Namespace) -> int:
    from dsv3.data.quality import (check_encoder, check_epochs, check_holdout, check_threshold,
                                   make_featurizer, read_labeled, train_quality)
    # the library's own checks, run before it reads the data or loads an encoder
    check_epochs(args.epochs, "--epochs")
    check_threshold(args.threshold, "--threshold")
    check_holdout(args.holdout, "--holdout")
    _input_file("--data", args.data)
    output_path("--out", args.out, directory=True)  # before the training, not at its save
    check_encoder(args.encoder, args.backend, "--encoder")
    texts, labels = read_labeled(args.data, args.text_field, args.label_field)
    featurizer = make_featurizer(args.backend, args.encoder)
    metrics = train_quality(texts, labels, featurizer, args.out, holdout=args.holdout,
                            threshold=args.threshold, seed=args.seed, epochs=args.epochs)
    print(json.dumps(metrics, indent=2))
    return 0


def _review(args: argparse.Namespace) -> int:
    from dsv3.data.review import estimate_precision, read_strata, read_verdicts, verdicts_to_labels
    _input_file("--sample", args.sample)
    if args.verdicts:
        _input_file("--verdicts", args.verdicts)
    if args.labels_out and os.path.isdir(args.labels_out):
        raise ValueError(f"--labels-out: {args.labels_out!r} is a directory, not a file")
    if args.labels_out:
        output_path("--labels-out", args.labels_out)
    for flag, given in (("--sample", args.sample), ("--verdicts", args.verdicts)):
        # the labels would replace the verdicts they are made from
        if args.labels_out and given and os.path.exists(args.labels_out) \
                and os.path.samefile(args.labels_out, given):
            raise ValueError(f"--labels-out: {args.labels_out!r} is the {flag} file; "
                             f"write the labels to another file")
    strata_path = os.path.join(os.path.dirname(args.sample), "strata.json")
    if not os.path.exists(strata_path):
        raise FileNotFoundError(f"--sample: no strata.json next to {args.sample!r}")
    items = read_verdicts(args.sample, args.verdicts)
    strata = read_strata(strata_path)
    report = {"judged": sum(it["verdict"] is not None for it in items), "of": len(items),
              "steps": estimate_precision(items, strata)}
    if args.labels_out:
        rows = verdicts_to_labels(items)
        os.makedirs(os.path.dirname(args.labels_out) or ".", exist_ok=True)
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        write_text_whole(args.labels_out, text)
        report["labels_written"] = len(rows)
    print(json.dumps(report, indent=2))
    return 0


def register(groups: argparse._SubParsersAction) -> None:
    data = groups.add_parser("data", help="data pipeline: prepare, review, quality classifier")
    commands = data.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    p = commands.add_parser("prepare", help="run the pipeline from a TOML config")
    p.add_argument("--config", required=True, help="TOML file (see dsv3/data/config.py) or a "
                   "shipped config's name: demo, deepseek_v3_recipe. Relative paths in it are "
                   "taken from the working directory, not from the file's directory")
    p.add_argument("--out", help="output directory (overrides [output] dir). A re-run into "
                   "the same directory replaces the earlier run: once it succeeds, the "
                   "kept/, tokens/ and dropped/ files that the earlier run's stats.json "
                   "lists and this run did not write are removed; no other file, and no "
                   "source, is touched. A run that fails leaves the directory as it was")
    p.add_argument("--skip-malformed", action="store_true",
                   help="skip and count malformed input records (a jsonl line that is "
                   "not JSON, a missing text field, a domain that cannot name a file; in a "
                   "text file, a line that is not UTF-8) instead of stopping at the first, "
                   "named by file and line; a file that cannot be read at all still stops "
                   "the run")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (datasets' own included)")
    p.add_argument("--backend", choices=["serial", "datasets", "spark"],
                   help="where per-document steps run (overrides [scale] backend)")
    p.add_argument("--num-proc", type=int, help="processes / Spark cores, >= 1 "
                   "(overrides [scale] num_proc); the serial backend ignores it, with a warning")
    p.set_defaults(func=_prepare)

    q = commands.add_parser("train-quality", help="train the quality classifier on labeled jsonl "
                            "and report precision/recall on a held-out split")
    q.add_argument("--data", required=True, help="jsonl with a text and a 0/1 label per line")
    q.add_argument("--out", required=True, help="directory for the model and metrics.json")
    q.add_argument("--backend", default="hashed", choices=["hashed", "hf"],
                   help="featurizer: hashed word and character n-grams (built in, no "
                   "download) or a frozen local HF encoder (needs --encoder)")
    q.add_argument("--encoder", help="local HF encoder directory (backend hf)")
    q.add_argument("--text-field", default="text", help="the field holding the text")
    q.add_argument("--label-field", default="label",
                   help="the field holding the label: 1 or true = good, 0 or false = bad")
    q.add_argument("--holdout", type=float, default=0.2, help="held-out fraction, in (0, 1)")
    q.add_argument("--threshold", type=float, default=0.5,
                   help="keep when P(good) >= this, in [0, 1]: the metrics are "
                   "reported at it, and it is saved with the model as the threshold that "
                   "prepare's [steps.quality] uses unless it sets its own")
    q.add_argument("--epochs", type=int, default=20, help="full-batch training passes, >= 1")
    q.add_argument("--seed", type=int, default=0,
                   help="seeds the held-out split and the training")
    q.set_defaults(func=_train_quality)

    r = commands.add_parser("review", help="read spot-check verdicts, estimate each step's "
                            "precision with a 95%% interval, optionally write classifier labels")
    r.add_argument("--sample", required=True, help="review/sample.jsonl written by prepare")
    r.add_argument("--verdicts", help="verdicts.jsonl from the review page (else the "
                   "'verdict' fields filled in the sample file are used)")
    r.add_argument("--labels-out", help="write the documents judged on the quality steps' "
                   "decisions (heuristics, quality; dedup and PII drops say nothing of "
                   "quality) as {text, label} jsonl for train-quality")
    r.set_defaults(func=_review)

    # dsv3.cli names the command in its "dsv3 COMMAND: error:" line by ``group``; a
    # subcommand's defaults are applied after its group's, so the line names the
    # subcommand too, as argparse's own usage errors do ("dsv3 data prepare: error:")
    for name, sub in commands.choices.items():
        sub.set_defaults(group=f"data {name}")
