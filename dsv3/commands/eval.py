"""``dsv3 eval``: the evaluation suite's command (defined in dsv3.eval.cli)."""
from dsv3.eval.cli import register

__all__ = ["register"]
