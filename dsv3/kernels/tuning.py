"""Triton's autotuner, compiling a new key's configs side by side before it times them.

Triton compiles each config when it first times it, one after the other. The grouped
GEMMs weigh up to 17 configs (dsv3/kernels/config.py) for every new key, so a model's
first step waits on some hundred compilations. Most of a compilation runs outside
the GIL (the MLIR passes, ptxas), so threads overlap them: on this project's 2-core
machine, 17 wgrad configs for sm_90 took 3.3 s in 2 threads against 5.5 s one by one.
Timing stays serial, as before: only the compiled kernels are shared. The picks are
kept on disk for the next process (autotune_cache).
"""
import contextlib
import copy
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from triton.runtime.autotuner import Autotuner
from triton.tools.tensor_descriptor import TensorDescriptor

from dsv3.kernels import autotune_cache


def _compile_threads() -> int:
    """DSV3_COMPILE_THREADS, else this process's share of the CPU cores: the ranks of
    a node (LOCAL_WORLD_SIZE, set by torchrun) tune at the same time."""
    setting = os.environ.get("DSV3_COMPILE_THREADS", "")
    if setting.strip():
        if not setting.strip().isdigit() or int(setting) < 1:
            raise ValueError(f"DSV3_COMPILE_THREADS must be a whole number >= 1, got {setting!r}")
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ranks = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return max(1, (cores or 1) // (int(ranks) if ranks.isdigit() and int(ranks) > 0 else 1))


# Threads for the compilations; 1 compiles lazily, as Triton's own autotuner does.
COMPILE_THREADS = _compile_threads()


class SideBySideAutotuner(Autotuner):
    """An Autotuner whose configs are compiled in threads once pruned for a new key
    (prune_configs runs only then), so that the timing finds each one compiled; and
    whose picks on a GPU are kept on disk (dsv3/kernels/autotune_cache.py)."""

    store = None  # the picks' file of the launch's device; None or False: none kept

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Each key's timings in this process, config -> ms (Triton keeps the last key's
        # only, in configs_timings): what benchmarks/gpu_bench.py reports per pick.
        self.timings = {}
        # Picks per GPU model (None: off the GPU). Triton's key holds no device, and a
        # pick timed on one model may not even launch on another (an H200's 196 KB of
        # shared memory against an A100's 163 KB) in a process that drives both.
        self.device = self.store = None
        self.picks = {None: self.cache}
        self.stores = {}
        # One launch at a time: the picks switch and Triton's run share this object's
        # state (cache, nargs), and threads driving two GPU models (nn.DataParallel)
        # would otherwise launch one model's pick on the other.
        self.lock = threading.Lock()

    def run(self, *args, **kwargs):
        with self.lock:
            if len(self.configs) > 1:
                self.use_picks_of(autotune_cache.device_name(dict(zip(self.arg_names, args))))
            keys_before = set(self.cache)
            result = super().run(*args, **kwargs)
            tuned = set(self.cache) - keys_before
            if tuned:
                timed = getattr(self, "configs_timings", None) or {}  # none with one left
                self.timings.update({key: dict(timed) for key in tuned})
                if self.store:
                    autotune_cache.save(self, self.store)
            return result

    def use_picks_of(self, device: str | None) -> None:
        """Switch ``cache`` (Triton's key -> pick) and ``store`` to ``device``'s, loading
        the stored picks on its first launch."""
        self.picks[self.device] = self.cache  # whatever it holds now, even if replaced
        if device == self.device:
            return
        if device not in self.picks:
            self.picks[device] = {}
            self.stores[device] = autotune_cache.store_for(self, device) or False
            if self.stores[device]:
                self.picks[device].update(autotune_cache.load(self, self.stores[device]))
        self.device, self.cache, self.store = device, self.picks[device], self.stores.get(device)

    def _bench(self, *args, config, **meta):
        """Triton's timing of one config; a config that fails otherwise than Triton
        expects (it forgives only running out of resources and compile-time asserts)
        counts as never finishing, with a warning, instead of failing the op's call.
        The TMA and persistent variants are new: one that some device, driver or
        Triton version rejects at launch must cost its place, not the model's step.
        Should every config fail, the launch of the pick raises the error itself."""
        try:
            return super()._bench(*args, config=config, **meta)
        except Exception as error:  # noqa: BLE001 - reported, and the config left out
            warnings.warn(f"{self.fn.__name__}: autotune config {config} failed and is left "
                          f"out ({type(error).__name__}: {error})", RuntimeWarning, stacklevel=2)
            return [float("inf")] * 3

    def prune_configs(self, kwargs):
        configs = super().prune_configs(kwargs)
        if len(configs) > 1 and COMPILE_THREADS > 1:
            compile_configs(self.fn, self.nargs, kwargs, configs)
        return configs


def autotune(kernel, configs, key, early_config_prune):
    """``triton.autotune(configs, key, prune_configs_by=...)(kernel)``, compiling side by
    side and keeping its picks."""
    return SideBySideAutotuner(kernel, kernel.arg_names, configs, key, reset_to_zero=None,
                               restore_value=None,
                               prune_configs_by={"early_config_prune": early_config_prune})


def compile_configs(jit_function, named_args: dict, kwargs: dict, configs) -> None:
    """Compile ``jit_function`` for each config with these arguments, into its cache.

    A config's pre-launch hook may set what the kernel is specialized on (a TMA
    descriptor's block shape), so each config gets its own copies of the descriptors.
    A config that fails to compile is left to the timed call, which compiles it again
    and handles the error as Triton's autotuner does (e.g. out of shared memory)."""
    # Triton compiles for, and keys its cache by, the calling thread's current device,
    # which a new thread must be told.
    device = autotune_cache.launch_device(named_args)

    def compile_one(config):
        args = {name: copy.copy(a) if isinstance(a, TensorDescriptor) else a
                for name, a in named_args.items()}
        # Autotuner.run's kwargs hold the launch's grid and warmup flag: compile only.
        meta = {**kwargs, **config.all_kwargs(), "warmup": True}
        if config.pre_hook:
            config.pre_hook({**args, **meta})
        with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
            try:
                jit_function.run(*args.values(), **meta)
            except Exception:  # reported by the timed call (see above)
                pass

    # The first one alone: it sets up the per-device cache the others then share.
    compile_one(configs[0])
    with ThreadPoolExecutor(min(COMPILE_THREADS, len(configs) - 1)) as pool:
        list(pool.map(compile_one, configs[1:]))
