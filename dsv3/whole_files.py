"""Writing files whole or not at all. A training run's checkpoint, export, metrics and
report, the evaluation's results and the data pipeline's models and labels are each
read back by a later run or command, which must never find half a file (a crash or
Ctrl-C mid-write) or an input overwritten by a failed write. Its own module, below
the trainer, the evaluation and the data pipeline, so that all of them can use it."""
import os
from pathlib import Path


def write_whole(path: Path, write, mode: str = "wb") -> None:
    """``write(file)`` into a temporary file, synced to disk before it replaces ``path``
    (without the sync a power loss after the rename can leave an empty file): ``path``
    is the old file or the whole new one, never part of it. Cut short (an error, a
    Ctrl-C), the temporary file goes."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_whole(path, text: str) -> None:
    """``text`` to ``path`` in UTF-8, whole or not at all (write_whole)."""
    write_whole(path, lambda f: f.write(text), "w")
