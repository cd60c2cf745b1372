"""``dsv3 eval``: the evaluation suite's command, defined in dsv3.eval.cli. Its ``run``
checks ``--device`` (and every other input) before the checkpoint is loaded, the same
for ``dsv3 eval`` and ``python -m dsv3.eval``."""
from __future__ import annotations

import argparse

from dsv3.eval import cli


def register(subparsers) -> argparse.ArgumentParser:
    return cli.register(subparsers)


__all__ = ["register"]
