"""``dsv3 report --run DIR``: rebuild a run's HTML report (curves, expert heat map)
with the evaluation's table added, once ``dsv3 eval`` has written DIR/eval."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _report(args: argparse.Namespace) -> int:
    from dsv3.train.checkpoint import load_state
    from dsv3.train.report import write_report

    run = Path(args.run)
    if not (run / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"--run: no metrics.jsonl in {str(run)!r} (not a training run?)")
    state = load_state(run)
    sections = []
    eval_json = Path(args.eval) if args.eval else run / "eval" / "eval.json"
    if eval_json.is_dir():
        eval_json = eval_json / "eval.json"
    if eval_json.is_file():
        from dsv3.eval.report import html_fragment
        sections.append("<h2>Evaluation</h2>" + html_fragment(json.loads(eval_json.read_text())))
    summary = {"steps": state["step"]} if state else None
    path = write_report(run, state["load_counts"] if state else None, summary, sections)
    print(path)
    return 0


def register(groups: argparse._SubParsersAction) -> None:
    parser = groups.add_parser("report", help="rebuild a training run's HTML report, with its "
                                              "evaluation")
    parser.add_argument("--run", required=True, help="the training run's out_dir")
    parser.add_argument("--eval", help="eval.json or its directory (default: RUN/eval)")
    parser.set_defaults(func=_report)
