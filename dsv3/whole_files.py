"""Writing files whole or not at all. A training run's checkpoint, export, metrics and
report, the evaluation's results and the data pipeline's models and labels are each
read back by a later run or command, which must never find half a file (a crash or
Ctrl-C mid-write) or an input overwritten by a failed write. Its own module, below
the trainer, the evaluation and the data pipeline, so that all of them can use it."""
import os
import secrets
import stat
from pathlib import Path


def write_whole(path: Path, write, mode: str = "wb") -> None:
    """``write(file)`` into a temporary file beside ``path``, synced to disk before
    it replaces ``path`` (without the sync a power loss after the rename can leave an
    empty file): ``path`` is the old file or the whole new one, never part of it. Cut
    short (an error, a Ctrl-C), the temporary file goes. The new file keeps the old
    one's permissions (a private 0600 file came back 0644), and a ``path`` that is a
    symbolic link has the file it points to replaced, the link kept (it was replaced
    by a plain file, and its target kept the old content). The temporary file's name is
    this write's own (``path``'s name, the process id, a random part, ".tmp"), created
    exclusively: with a fixed ``path`` + ".tmp", two writers of one file (two ranks,
    two commands) wrote into the same temporary file, and a user's own file of that
    name was overwritten, then deleted."""
    path = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    exclusive = mode.replace("w", "x")  # never opens a file that is already there
    # Opened before the try: a failed open has made nothing to remove.
    file = open(tmp, exclusive, **({} if "b" in mode else {"encoding": "utf-8"}))
    try:
        with file as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:  # a new file: the umask's permissions, as open() gave
            pass
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    """The rename itself to disk: until the directory is synced, a power loss may
    still undo it (the old file back). Where a file system cannot sync a directory,
    the write stands as it is."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_whole(path, text: str) -> None:
    """``text`` to ``path`` in UTF-8, whole or not at all (write_whole)."""
    write_whole(path, lambda f: f.write(text), "w")
