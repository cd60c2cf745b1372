"""``dsv3 report --run DIR``: rebuild a run's HTML report (curves, expert heat map)
with the evaluation's table added, once ``dsv3 eval`` has written DIR/eval."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _eval_json(run: Path, given: str | None) -> Path | None:
    """The evaluation to add: RUN/eval/eval.json when the run has one (a run need not
    have been evaluated), or the file --eval names, which must exist: a typo there
    would otherwise give, silently, a report without its evaluation."""
    path = Path(given) if given is not None else run / "eval"
    if path.is_dir():
        path = path / "eval.json"
    if path.is_file():
        return path
    if given is not None:
        raise FileNotFoundError(f"--eval: expected an eval.json or a directory holding one, "
                                f"but {str(path)!r} does not exist")
    return None


def _eval_section(path: Path, option: str) -> str:
    """The evaluation's HTML; ``option`` (--eval or --run) is named if the file is bad."""
    from dsv3.eval.report import html_fragment

    try:
        results = json.loads(path.read_text())
    except ValueError as e:  # name the file, not just "Expecting value: line 1 ..."
        raise ValueError(f"{option}: {str(path)!r} is not JSON ({e})") from None
    if not (isinstance(results, dict) and isinstance(results.get("tasks"), dict)):
        raise ValueError(f"{option}: {str(path)!r} is not a dsv3 eval.json "
                         f"(expected an object with a 'tasks' object)")
    try:  # a hand-edited or cut-short file: name the file and the task's missing field
        return html_fragment(results)  # brings its own <h2>Evaluation</h2>
    except ValueError as e:
        raise ValueError(f"{option}: {str(path)!r} is not a complete dsv3 eval.json: {e}") from None


def _report(args: argparse.Namespace) -> int:
    from dsv3.train.checkpoint import load_state, run_load_counts
    from dsv3.train.report import write_report

    run = Path(args.run)
    if not (run / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"--run: no metrics.jsonl in {str(run)!r} (not a training run?)")
    eval_json = _eval_json(run, args.eval)  # before loading the checkpoint: fail fast
    option = "--eval" if args.eval is not None else "--run"
    sections = [_eval_section(eval_json, option)] if eval_json else []
    state = load_state(run)
    # The trainer's own summary (summary.json) when it wrote one; else what the checkpoint
    # says, on the page only: summary.json is the trainer's (see write_report).
    fallback = {"steps": state["step"]} if state else None
    load_counts = None
    if state:
        try:
            load_counts = run_load_counts(run, state)
        except FileNotFoundError as e:  # e.g. a DDP run copied with rank 0's files alone
            print(f"dsv3 report: warning: the heat map counts rank 0's tokens only: {e}",
                  file=sys.stderr)
            load_counts = state["load_counts"]
    path = write_report(run, load_counts, None, sections, fallback_summary=fallback,
                        warn=lambda message: print(f"dsv3 report: warning: {message}",
                                                   file=sys.stderr))
    print(path)
    return 0


def register(groups: argparse._SubParsersAction) -> None:
    parser = groups.add_parser("report", help="rebuild a training run's HTML report, with its "
                                              "evaluation")
    parser.add_argument("--run", required=True, help="the training run's out_dir")
    parser.add_argument("--eval", help="eval.json or its directory (default: RUN/eval, if "
                                       "the run has one)")
    parser.set_defaults(func=_report)
