"""Checks of settings and options, shared so that every config and command refuses a bad
value the same way: the exception type, and a message that names the setting (``label``),
what was expected and what came ("optim.lr must be > 0, got 0"). Each used to carry its
own copy of these checks, with small differences in what they let through."""
import argparse
import functools
import math
import os


class WrongType(TypeError, ValueError):
    """A value of the wrong type. A TypeError, and a ValueError too: some settings
    (MoEConfig's sizes, TrainConfig's step counts) refused a wrong type with ValueError
    before the checks were shared here, and code that catches that still works."""


def of_type(label: str, value, kind: type) -> None:
    if not isinstance(value, kind):
        raise WrongType(f"{label} must be a {kind.__name__}, got {value!r}")


def whole_number(label: str, value, minimum: int | None = None) -> None:
    """An int (not a bool), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise WrongType(f"{label} must be a whole number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{label} must be >= {minimum}, got {value}")


def number(label: str, value, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> None:
    """A finite int or float (not a bool) between ``low`` and ``high`` (each excluded
    when its ``*_open`` is set)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WrongType(f"{label} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{label} must be finite, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        if high is None:
            expected = f"{'>' if low_open else '>='} {low:g}"
        elif low is None:
            expected = f"{'<' if high_open else '<='} {high:g}"
        else:
            expected = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{label} must be {expected}, got {value!r}")


def option(parse):
    """``parse(text)`` as an argparse ``type=``: the TypeError/ValueError it raises is
    printed as "argument --OPTION: MESSAGE" under the usage line (exit status 2), not as
    argparse's bare "invalid ... value"."""
    @functools.wraps(parse)
    def parse_option(text: str):
        try:
            return parse(text)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse_option


def output_path(label: str, path, directory: bool = False) -> None:
    """Fail now, not after the work ran, when ``path`` cannot be written: a file where
    a directory is wanted (or the other way round), a file on the way to it, or a
    directory this user may not write to."""
    path = os.path.abspath(path)
    kind = "directory" if directory else "file"
    if os.path.exists(path) and os.path.isdir(path) != directory:
        raise ValueError(f"{label}: {path} exists and is not a {kind}; a {kind} path is expected")
    target = path if directory and os.path.isdir(path) else os.path.dirname(path)
    while not os.path.exists(target):  # the nearest part that exists is where it is created
        target = os.path.dirname(target)
    if not os.path.isdir(target):
        raise ValueError(f"{label}: cannot create {path}: {target} is a file, not a directory")
    if not os.access(target, os.W_OK):
        raise ValueError(f"{label}: cannot write {path}: {target} is not writable")
    missing = path if directory else os.path.dirname(path)
    if not os.path.exists(missing):
        _try_to_create(label, path, missing, target)


def _try_to_create(label: str, path: str, missing: str, existing: str) -> None:
    """Create the directories from ``existing`` down to ``missing``, then remove them
    again: permission bits pass where a file system takes no directory (/proc, /sys:
    there it failed later, as a bare "[Errno 2] No such file or directory")."""
    try:
        os.makedirs(missing)
    except OSError as e:
        raise ValueError(f"{label}: cannot create {path}: {e.strerror} "
                         f"(in {existing})") from None
    while missing != existing:  # empty: only this check made them
        try:
            os.rmdir(missing)
        except OSError:
            break
        missing = os.path.dirname(missing)
