"""One ``dsv3 data prepare`` at a time per output directory.

Two runs into one directory (a job started twice, a scheduler's retry while the first
attempt still runs) would each stage their outputs and then move them in over each
other: one run's journal replaced by the other's mid-move, a tokenizer of one run next
to the tokens of the other, which is what the journal of dsv3.data.movein is there to
prevent. So a run holds ``LOCK`` in the directory (``filelock``: an ``flock`` on Unix,
released by the kernel however its holder dies) from before it finishes an interrupted
move until its own move is done, and a second run stops at once with an error.

The lock file stays in place after a run, as filelock leaves it: a waiter and a new
run must lock the same file.
"""
from __future__ import annotations

import contextlib
import os

import filelock

LOCK = ".prepare.lock"  # hidden, like the stage and the journal: no source glob matches it


def lock_path(out: str) -> str:
    return os.path.join(out, LOCK)


@contextlib.contextmanager
def exclusive_run(out: str):
    """Held while one run writes ``out``; raises ValueError if another run holds it."""
    lock = filelock.FileLock(lock_path(out))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise ValueError(f"output.dir: {out!r} is being written by another `dsv3 data "
                         f"prepare` (it holds {lock_path(out)!r}); wait for it to end, or "
                         f"write this run to another directory") from None
    try:
        yield
    finally:
        lock.release()
