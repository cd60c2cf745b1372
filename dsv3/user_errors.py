"""Which exceptions a command reports as bad input, in one error line with exit status
2 as argparse does, and which as a bug, with its traceback; and how a Ctrl-C that no
command caught ends. Shared by the ``dsv3`` command and ``python -m dsv3.eval``, so
that both draw the line in the same place."""
import os
import sys

# What a shell reports for a command that Ctrl-C (SIGINT, signal 2) ended: 128 + 2.
INTERRUPTED_STATUS = 130
# ... and one whose output pipe closed (SIGPIPE, signal 13): 128 + 13.
CLOSED_PIPE_STATUS = 141


def is_bad_input(error: BaseException) -> bool:
    """A ValueError/TypeError (the messages name the setting at fault), a missing
    optional package, a missing file (dsv3's own messages name the option), or any
    other OSError about a path (a directory, not writable), which names the path.
    An OSError without one (a timeout, a broken connection) is not about the input."""
    if isinstance(error, (ValueError, TypeError, ImportError, FileNotFoundError)):
        return True
    return isinstance(error, OSError) and error.filename is not None


def interrupted(prog: str) -> int:
    """A Ctrl-C is the user's choice, not a bug: one line instead of a traceback, and the
    shell's status for it. Commands that can stop cleanly (``train`` saves first,
    ``data prepare`` says what it left) catch it before this, with lines of their own."""
    print(f"{prog}: interrupted", file=sys.stderr)
    return INTERRUPTED_STATUS


def stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone: a BrokenPipeError from anything
    else (a socket, a worker's pipe) is a real failure, not a ``| head`` that stopped
    reading. Asked of the pipe itself (POLLERR), and of any output still buffered."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    try:
        import select
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLERR)
        return bool(poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor: not a pipe
        return False


def closed_pipe() -> int:
    """Output piped to a reader that stopped early (``dsv3 plan | head``): end quietly,
    as other command-line tools do, not with a BrokenPipeError traceback. stdout goes
    to /dev/null first, so that Python's flush at exit finds no closed pipe either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return CLOSED_PIPE_STATUS
