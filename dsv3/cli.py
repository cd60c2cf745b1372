"""The ``dsv3`` command.

Each command group is one module in :mod:`dsv3.commands` with a
``register(subparsers)`` function that adds its parser and sets ``func`` on it;
``main`` discovers the modules, so adding ``dsv3 train`` or ``dsv3 eval`` is adding one
file, with no edit here. A handler returns an exit code; bad input it raises
(dsv3.user_errors: a ValueError/TypeError naming the setting at fault, a path that
is missing, a directory or not writable, a missing optional package) is printed as
one ``dsv3 COMMAND: error:`` line with exit status 2, as argparse does for a bad
option; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import dsv3.commands
from dsv3.user_errors import is_bad_input


# The optional packages the commands import, and the pyproject extra that brings each.
OPTIONAL_PACKAGES = {"datasets": "data", "datasketch": "data", "pyarrow": "data",
                     "xxhash": "data", "tokenizers": "train", "tensorboard": "train",
                     "matplotlib": "train", "yaml": "train", "sacrebleu": "eval",
                     "transformers": "transformers", "pyspark": "spark"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv3", description="dsv3: a Mixture-of-Experts engine for PyTorch; its data "
        "pipeline, trainer and evaluation as commands")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(dsv3.commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"dsv3.commands.{info.name}").register(groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        if not is_bad_input(e):
            raise
        hint = ""
        if isinstance(e, ModuleNotFoundError) and e.name in OPTIONAL_PACKAGES:
            hint = f" (an optional package: pip install 'dsv3[{OPTIONAL_PACKAGES[e.name]}]')"
        print(f"{parser.prog} {args.group}: error: {e}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
