"""CPU grouped GEMM under even and skewed routing. When segments are small, how the
experts are split among threads decides the time (csrc/cpu/grouped_mm.cpp,
for_each_expert).

Prints the median time (µs) of ``ops.grouped_mm`` for three row distributions:
512 rows, 8 experts, D=256 -> 1024, 2 threads. To compare two builds, run it
alternately from each checkout; the figures in RESULTS.md were taken that way.

    python -m benchmarks.expert_split [--distributions balanced skewed hot]
                                      [--dtypes bf16 fp32] [--threads 2] [--calls 300]
"""
import argparse
import time

import torch

from dsv3 import ops

ROWS_PER_EXPERT = {
    "balanced": [64] * 8,
    "skewed": [79, 3, 127, 0, 0, 237, 57, 9],  # layer 1 of the transformers bench's Mixtral
    "hot": [300, 30, 30, 30, 30, 30, 30, 32],  # one expert over a thread's share
}


def median_us(fn, calls: int = 300) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[calls // 2] * 1e6


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--distributions", nargs="+", default=list(ROWS_PER_EXPERT),
                        choices=list(ROWS_PER_EXPERT),
                        help="row distributions over the 8 experts (default: all)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES),
                        help="dtypes to time (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--calls", type=int, default=300,
                        help="timed calls per cell, after 20 warm-up calls (default: 300)")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.threads < 1:
        parser.error("--calls and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    cells = []
    for name in args.distributions:
        counts = ROWS_PER_EXPERT[name]
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            x_SX = torch.randn(sum(counts), 256, dtype=dtype)
            w_EXY = torch.randn(len(counts), 256, 1024, dtype=dtype)
            offsets_E = torch.tensor(counts).cumsum(0).to(torch.int32)
            us = median_us(lambda: ops.grouped_mm(x_SX, w_EXY, offsets_E), args.calls)
            cells.append(f"{name}-{str(dtype).removeprefix('torch.')}={us:.0f} µs")
    print(f"median µs per ops.grouped_mm call ({args.threads} threads): " + ", ".join(cells))


if __name__ == "__main__":
    main()
