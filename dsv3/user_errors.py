"""Which exceptions a command reports as bad input, in one error line with exit status
2 as argparse does, and which as a bug, with its traceback. Shared by the ``dsv3``
command and ``python -m dsv3.eval``, so that both draw the line in the same place."""


def is_bad_input(error: BaseException) -> bool:
    """A ValueError/TypeError (the messages name the setting at fault), a missing
    optional package, a missing file (dsv3's own messages name the option), or any
    other OSError about a path (a directory, not writable), which names the path.
    An OSError without one (a timeout, a broken connection) is not about the input."""
    if isinstance(error, (ValueError, TypeError, ImportError, FileNotFoundError)):
        return True
    return isinstance(error, OSError) and error.filename is not None
