"""Autotune picks kept on disk: a new process on the same GPU model, with the same
Triton, kernel source and configs, starts from the configs its predecessors timed.

Why: Triton times every config of a new key in every process (its own on-disk
record of picks, ``cache_results``, passes over kernels whose configs have
pre-launch hooks, as the GEMMs' TMA configs do). That costs each training start
~2 s a key (17 wgrad configs, each run for ~0.13 s by Triton's default warm-up and
repetitions), and since two configs may round the fp32 sums differently, a
restarted run could pick another one and no longer reproduce the first bit for bit.

``DSV3_AUTOTUNE_CACHE=0`` turns it off; ``DSV3_AUTOTUNE_CACHE_DIR`` moves it (default
``~/.cache/dsv3/autotune``). A file per kernel and fingerprint. A save merges the
process's picks into the file under a lock and writes it whole through a rename, so
ranks tuning different keys at once keep each other's, and a reader never sees half
of a file.
"""
import contextlib
import functools
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: saves there go unlocked
    fcntl = None

import torch
import triton

ENABLED = os.environ.get("DSV3_AUTOTUNE_CACHE", "1") != "0"


def cache_dir() -> Path:
    return Path(os.environ.get("DSV3_AUTOTUNE_CACHE_DIR")
                or Path.home() / ".cache" / "dsv3" / "autotune")


def store_for(tuner, device: str | None) -> Path | None:
    """The file of ``tuner``'s picks on ``device`` (a device_name), or None where none
    are kept: turned off, off the GPU (None), or no folder to keep them in."""
    if not ENABLED or device is None:
        return None
    try:
        return store_path(tuner, device)
    except RuntimeError as error:  # Path.home() without HOME or a passwd entry
        warnings.warn(f"dsv3: autotune picks not kept ({error}); set DSV3_AUTOTUNE_CACHE_DIR",
                      stacklevel=3)
        return None


def launch_device(named_args: dict) -> int | None:
    """The CUDA device a launch with these arguments runs on (Triton launches on the
    calling thread's current one), or None where no argument is on a GPU."""
    if not any(isinstance(a, torch.Tensor) and a.device.type == "cuda"
               for a in named_args.values()):
        return None
    return torch.cuda.current_device()


def device_name(named_args: dict) -> str | None:
    """The GPU model the launch runs on, or None off the GPU: picks are kept for GPUs
    only."""
    index = launch_device(named_args)
    return None if index is None else _name_of(index)


@functools.cache
def _name_of(index: int) -> str:
    # Once per device: the tuners ask at every launch.
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} sm_{major}{minor}"


def store_path(tuner, device: str) -> Path:
    """The file of ``tuner``'s picks on ``device``: named by everything a pick depends
    on, so that a change to any of them starts afresh."""
    fingerprint = json.dumps({
        "kernel": tuner.fn.cache_key,  # the source of the kernel and what it calls
        "triton": triton.__version__,
        "device": device,
        "key": list(tuner.keys),
        "configs": [sorted(config.all_kwargs().items()) for config in tuner.configs],
    }, default=str)
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:20]
    return cache_dir() / f"{tuner.fn.__name__}-{digest}.json"


def load(tuner, path: Path) -> dict:
    """The picks stored at ``path``, as ``tuner.cache`` entries (key tuple -> config)."""
    try:
        entries = json.loads(path.read_text())
        return {tuple(key): tuner.configs[index] for key, index in entries
                if 0 <= index < len(tuner.configs)}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError) as error:  # unreadable: tune again, and say so
        warnings.warn(f"dsv3: ignoring the autotune picks in {path}: {error}", stacklevel=2)
        return {}


def save(tuner, path: Path) -> None:
    """Merge ``tuner.cache`` into the picks at ``path``. A failure (read-only home,
    full disk) costs only the next process's tuning, so it is a warning."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            picks = {**load(tuner, path), **tuner.cache}
            entries = [[list(key), index] for key, config in picks.items()
                       for index, candidate in enumerate(tuner.configs) if candidate is config]
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            try:
                with os.fdopen(handle, "w") as file:
                    json.dump(entries, file)
                os.replace(temporary, path)
            except BaseException:
                os.unlink(temporary)
                raise
    except OSError as error:
        warnings.warn(f"dsv3: could not keep the autotune picks in {path}: {error}", stacklevel=2)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path``'s lock file, for one read-merge-write."""
    if fcntl is None:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
