"""The grouped GEMM launches that benchmarks/gpu_check.sh runs under Nsight Compute
(``ncu``): the DeepSeek-V3-like wgrad at 4096 tokens (32 local experts of 128 rows,
two BLOCK_K steps a tile), the GEMM furthest behind ``torch._grouped_mm`` in run 4
(0.78x), in the launch the autotuner picked there (grid, TMA), the persistent TMA
one, and that one with its walk flattened at both tile sizes the autotuner weighs.
Timings say how far a kernel is from its bound; ncu's throughput, occupancy and
warp-stall sections say why, which no amount of timing shows. (Run 4 profiled the
Mixtral-like wgrad's grid, persistent and TMA launches: benchmarks/RESULTS.md.)

Each config runs once, fixed (no autotuning: its many timed launches would drown the
profile); ncu measures the kernel alone, so its compilation before the launch does
not count.

    python -m benchmarks.ncu_case [--smoke]
    TRITON_INTERPRET=1 python -m benchmarks.ncu_case --smoke   # on a machine without a GPU
"""
import argparse
import os
import sys

import torch
import triton

from dsv3.kernels import config, grouped_gemm

# (T, D, F, E, K) of gpu_bench's "dsv3-like T4096" GEMM shape: 4096 routed rows, 32 experts.
SHAPE = (4096, 7168, 2048, 32, 1)


def launches():
    """(name, config) of each profiled launch: the autotuner's configs of these tiles
    (8 warps, 3 stages, as config.VARIANT_TILES), whatever configs it holds here."""
    def tile(block_n):
        return triton.Config({"BLOCK_M": 128, "BLOCK_N": block_n, "BLOCK_K": 64}, num_warps=8,
                             num_stages=3)

    return {"wgrad grid tma 128x128": config.wgrad_variant(tile(128), tma=True),
            "wgrad persistent tma nested 128x128": config.wgrad_variant(tile(128), True, True),
            "wgrad persistent tma flat 128x128": config.wgrad_variant(tile(128), True, True, True),
            "wgrad persistent tma flat 128x256": config.wgrad_variant(tile(256), True, True, True)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU under TRITON_INTERPRET=1: checks the script")
    args = parser.parse_args(argv)
    # Triton reads TRITON_INTERPRET when it is imported (already done above), so it
    # cannot be set from here: say what to do instead of Triton's "0 active drivers".
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("ncu_case: no CUDA GPU here; " + (
            "run the smoke test as TRITON_INTERPRET=1 python -m benchmarks.ncu_case --smoke"
            if args.smoke else "run it on a GPU, or check the script with "
            "TRITON_INTERPRET=1 python -m benchmarks.ncu_case --smoke"))
    # fp16 on the CPU: TMA-readable as bf16 is on the GPU (the interpreter's bf16 dot is
    # wrong), so the smoke run takes the same walks.
    device, dtype = ("cpu", torch.float16) if args.smoke else ("cuda", torch.bfloat16)
    T, D, F, E, K = (64, 32, 48, 4, 2) if args.smoke else SHAPE
    rows = T * K
    x_SD = torch.randn(rows, D, device=device, dtype=dtype)
    dy_S2F = torch.randn(rows, 2 * F, device=device, dtype=dtype)
    offsets_E = torch.linspace(rows // E, rows, E, device=device).to(torch.int32)
    for name, launch in launches().items():
        out = grouped_gemm.grouped_mm_wgrad_with(launch, x_SD, dy_S2F, offsets_E, True)
        print(f"ran {name}: {tuple(out.shape)}, finite {bool(out.float().isfinite().all())}",
              flush=True)


if __name__ == "__main__":
    main()
