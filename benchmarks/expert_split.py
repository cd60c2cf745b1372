"""CPU grouped GEMM under even and skewed routing. When segments are small, how the
experts are split among threads decides the time (csrc/cpu/grouped_mm.cpp,
for_each_expert).

Prints the median microseconds of ``ops.grouped_mm`` for three row distributions:
512 rows, 8 experts, D=256 -> 1024, 2 threads. To compare two builds, run it
alternately from each checkout; the figures in RESULTS.md were taken that way.

    python -m benchmarks.expert_split
"""
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


def main() -> None:
    torch.set_num_threads(2)
    cells = []
    for name, counts in ROWS_PER_EXPERT.items():
        for dtype in (torch.bfloat16, torch.float32):
            x_SX = torch.randn(sum(counts), 256, dtype=dtype)
            w_EXY = torch.randn(len(counts), 256, 1024, dtype=dtype)
            offsets_E = torch.tensor(counts).cumsum(0).to(torch.int32)
            us = median_us(lambda: ops.grouped_mm(x_SX, w_EXY, offsets_E))
            cells.append(f"{name}-{str(dtype).removeprefix('torch.')}={us:.0f}")
    print(" ".join(cells))


if __name__ == "__main__":
    main()
