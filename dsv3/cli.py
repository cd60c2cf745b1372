"""The ``dsv3`` command.

Each command group is one module in :mod:`dsv3.commands` with a
``register(subparsers)`` function that adds its parser and sets ``func`` on it;
``main`` discovers the modules, so adding ``dsv3 train`` or ``dsv3 eval`` is adding one
file, with no edit here. A handler returns an exit code; bad input it raises
(dsv3.user_errors: a ValueError/TypeError naming the setting at fault, a path that
is missing, a directory or not writable, a missing optional package) is printed as
one ``dsv3 COMMAND: error:`` line with exit status 2, as argparse does for a bad
option; a Ctrl-C that the command did not catch itself is one ``interrupted`` line
with status 130, output cut off by a closed pipe ends quietly with status 141; any
other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import dsv3.commands
from dsv3.user_errors import closed_pipe, interrupted, is_bad_input, stdout_closed


# The optional packages the commands import, and the pyproject extra that brings each.
OPTIONAL_PACKAGES = {"datasets": "data", "datasketch": "data", "pyarrow": "data",
                     "xxhash": "data", "tokenizers": "train", "tensorboard": "train",
                     "matplotlib": "train", "yaml": "train", "sacrebleu": "eval",
                     "transformers": "transformers", "pyspark": "spark"}


def version_line() -> str:
    """dsv3's version and what its kernels run on: the first lines a bug report needs."""
    import torch

    import dsv3
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    from dsv3.ops import CUDA_KERNELS_BUILT as cuda
    return (f"dsv3 {dsv3.__version__} (torch {torch.__version__}, triton {triton_version}, "
            f"CUDA kernels {'built' if cuda else 'not built'})")


class _VersionAction(argparse.Action):
    """--version, its line made only when asked (it imports triton)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv3", description="dsv3: a Mixture-of-Experts engine for PyTorch; its data "
        "pipeline, trainer and evaluation as commands")
    parser.add_argument("--version", action=_VersionAction,
                        help="show dsv3's, torch's and triton's versions and exit")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(dsv3.commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"dsv3.commands.{info.name}").register(groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, handled below, not at exit
        return status
    except KeyboardInterrupt:
        return interrupted(f"{parser.prog} {args.group}")
    except BrokenPipeError:
        if not stdout_closed():  # another pipe or socket broke: a real failure
            raise
        return closed_pipe()
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
