"""Reading files written by ``torch.save`` (checkpoints, exported weights) with errors
that name the file.

A file cut short by a full disk, or overwritten by something else, makes
``torch.load`` fail in its zip or pickle reader, with messages such as "invalid load
key" or "Invalid argument" (no path) or, with ``mmap=True``, advice about the
serialization format: the CLIs showed them as tracebacks. ``load`` turns them into
one ValueError that says which file and what to do."""
import pickle
import zipfile
from pathlib import Path

import torch

# What torch.load raises on bytes that are not a torch.save file (its zip reader's
# failures are RuntimeErrors; a short file can also end in EOFError or OSError).
_UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError,
               zipfile.BadZipFile, UnicodeDecodeError)


def load(path, what: str = "checkpoint", **kwargs):
    """``torch.load(path, **kwargs)``; a file that is missing, unreadable to this user or
    a directory stays that OSError, one that cannot be read as a torch.save file is a
    ValueError naming it."""
    try:
        return torch.load(path, **kwargs)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # the path's own trouble, which the error names: not a damaged file
    except _UNREADABLE as e:
        detail = " ".join(str(e).split())[:200]
        raise ValueError(f"{Path(path)} is not a readable {what} file (cut short or "
                         f"overwritten? {type(e).__name__}: {detail})") from None
