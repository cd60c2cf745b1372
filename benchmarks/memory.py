"""Peak extra memory of one forward+backward, per provider, each in a fresh process.

CPU tensors come straight from malloc and torch keeps no allocator statistics for
them, so this reads the kernel's own accounting: after a warm-up step and with
the gradients dropped, reset the resident-set high-water mark (write "5" to
/proc/self/clear_refs), note VmRSS, run one step and read VmHWM. The difference
is the most memory the step held at once beyond inputs and weights: its
activations, temporaries and the fresh gradients. dsv3's cache of large output
buffers is emptied before the baseline, so reused buffers are not hidden in it.

Two things keep the number honest. A fresh process per case, so no earlier
case's heap fragments or caches are counted or reused. And
MALLOC_MMAP_THRESHOLD_=65536 in that process's environment (glibc reads it at
start-up): blocks above 64 KiB are mmapped and returned to the OS when freed,
so the baseline is not inflated by the warm-up's freed activations, and a fixed
threshold stops glibc from raising it dynamically after the first large free.

    python -m benchmarks.memory --calibrate   # a 100 MiB tensor should read ~100 MiB
"""
import argparse
import gc
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable

import torch

MIB = 2**20
CALIBRATION_MIB = 100
_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        kib = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1)
    return int(kib) * 1024


def peak_extra_bytes(step: Callable[[], object], drop: Callable[[], None]) -> int:
    """Bytes above the settled baseline that one call of ``step`` peaks at;
    ``drop`` frees what a step leaves behind (its gradients)."""
    step()  # warm-up: thread pools, lazily built kernels and tables
    drop()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := VmRSS
    baseline = _status_bytes("VmRSS")
    step()
    return _status_bytes("VmHWM") - baseline


def _child(args) -> dict:
    if args.calibrate:
        def allocate():
            torch.ones(CALIBRATION_MIB * MIB // 4)  # ones, not empty: pages must be touched
        return {"peak_extra_mib": peak_extra_bytes(allocate, lambda: None) / MIB}
    from benchmarks.providers import DTYPES, Shape, make_step
    step = make_step(args.provider, Shape.parse(args.shape), DTYPES[args.dtype])

    def drop():
        step.drop_grads()
        # dsv3 keeps freed large outputs for reuse (csrc/cpu/alloc.h): release them so
        # the baseline holds none and the step's own peak is what gets counted.
        torch.ops.dsv3.release_cached_memory()

    return {"peak_extra_mib": peak_extra_bytes(step, drop) / MIB}


class ChildFailed(RuntimeError):
    """The measuring process failed; the message ends with the last lines of its stderr."""


STDERR_TAIL_LINES = 15


def _run_child(*child_args: str) -> float:
    command = [sys.executable, "-m", "benchmarks.memory", "--child", *child_args]
    result = subprocess.run(command, env={**os.environ, **_ENV}, capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.strip():
        tail = "\n".join(result.stderr.strip().splitlines()[-STDERR_TAIL_LINES:])
        raise ChildFailed(f"measuring process `python -m benchmarks.memory --child "
                          f"{' '.join(child_args)}` exited with status {result.returncode}; "
                          f"its stderr ends:\n{tail or '(empty)'}")
    return json.loads(result.stdout.splitlines()[-1])["peak_extra_mib"]


def peak_extra_mib(shape_name: str, dtype_name: str, provider: str) -> float:
    """Peak extra MiB of one forward+backward of ``provider``, in a fresh process.
    The caller checks availability first (see providers.unavailable_reason)."""
    return _run_child("--shape", shape_name, "--dtype", dtype_name, "--provider", provider)


def calibration_mib() -> float:
    """What the method reads for a known CALIBRATION_MIB allocation."""
    return _run_child("--calibrate")


def _shape_name(name: str) -> str:
    from benchmarks.providers import Shape
    try:
        Shape.parse(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name


def main(argv=None) -> None:
    from benchmarks.providers import DTYPES, PROVIDERS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="e.g. python -m benchmarks.memory --shape "
                                            "T4096-D512-F1024-E8-K2 --dtype fp32 --provider dsv3")
    parser.add_argument("--child", action="store_true", help="measure in this process (internal)")
    parser.add_argument("--calibrate", action="store_true",
                        help=f"measure a known {CALIBRATION_MIB} MiB allocation instead")
    parser.add_argument("--shape", type=_shape_name,
                        help="layer shape, T<tokens>-D<dim>-F<ffn>-E<experts>-K<top-k>")
    parser.add_argument("--dtype", choices=list(DTYPES))
    parser.add_argument("--provider", choices=list(PROVIDERS))
    args = parser.parse_args(argv)
    if not args.calibrate and None in (args.shape, args.dtype, args.provider):
        parser.error("give --calibrate, or --shape, --dtype and --provider")
    if args.child:
        print(json.dumps(_child(args)))
        return
    try:
        if args.calibrate:
            print(f"a {CALIBRATION_MIB} MiB tensor reads as {calibration_mib():.1f} MiB")
        else:
            print(f"{args.shape} {args.dtype} {args.provider}: "
                  f"{peak_extra_mib(args.shape, args.dtype, args.provider):.1f} MiB")
    except ChildFailed as error:
        sys.exit(f"memory: {error}")


if __name__ == "__main__":
    main()
