"""The grouped GEMM launches that benchmarks/gpu_check.sh runs under Nsight Compute
(``ncu``): the Mixtral-like wgrad, the GEMM furthest from its bound on the H200
(0.68 of dense cuBLAS against the forward's 0.86, run 2), in its grid, persistent
and TMA launches, with the forward of the same shape beside it. Timings say how far
a kernel is from its bound; ncu's throughput, occupancy and warp-stall sections say
why, which no amount of timing shows.

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

from dsv3.kernels import config, grouped_gemm

# (T, D, F, E, K) of gpu_bench's "mixtral-like" GEMM shape: 8192 routed rows, 8 experts.
SHAPE = (4096, 4096, 14336, 8, 2)


def launches():
    """(name, config) of each profiled launch: the pointer-grid tile the tuner starts
    from, and its persistent and TMA variants."""
    tile = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
    wgrad = {name: config.config_with(config.wgrad_configs()[0], config.wgrad_tma_block_shapes,
                                      PERSISTENT=persistent, USE_TMA=tma, **tile)
             for name, persistent, tma in [("wgrad grid pointer", False, False),
                                           ("wgrad persistent pointer", True, False),
                                           ("wgrad grid tma", False, True)]}
    return {"forward pointer": config.config_with(config.matmul_configs()[0], USE_TMA=False,
                                                  FLATTEN=False, **tile), **wgrad}


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
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    T, D, F, E, K = (64, 32, 48, 4, 2) if args.smoke else SHAPE
    rows = T * K
    x_SD = torch.randn(rows, D, device=device, dtype=dtype)
    dy_S2F = torch.randn(rows, 2 * F, device=device, dtype=dtype)
    w_ED2F = torch.randn(E, 2 * F, D, device=device, dtype=dtype).transpose(1, 2) * D ** -0.5
    offsets_E = torch.linspace(rows // E, rows, E, device=device).to(torch.int32)
    for name, launch in launches().items():
        if name.startswith("forward"):
            out = grouped_gemm.grouped_mm_with(launch, x_SD, w_ED2F, offsets_E)
        else:
            out = grouped_gemm.grouped_mm_wgrad_with(launch, x_SD, dy_S2F, offsets_E, True)
        print(f"ran {name}: {tuple(out.shape)}, finite {bool(out.float().isfinite().all())}",
              flush=True)


if __name__ == "__main__":
    main()
