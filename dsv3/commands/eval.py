"""``dsv3 eval``: the evaluation suite's command (defined in dsv3.eval.cli), with
``--device`` checked before the checkpoint is loaded."""
from __future__ import annotations

import argparse

from dsv3.eval import cli


def register(subparsers) -> argparse.ArgumentParser:
    parser = cli.register(subparsers)
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    from dsv3.cli import check_device

    check_device(args.device)
    return cli.run(args)


__all__ = ["register"]
