"""The CPU GEMMs of a bf16 layer through fp32 copies against torch's own
half-precision matmul (csrc/cpu/half_gemm.h, ``DSV3_CPU_HALF_GEMM=fp32`` against
``native``), side by side: the layer step's time and its peak extra memory. Where
torch has no native bf16/fp16 matmul (AVX2 CPUs), ``auto`` takes the fp32 copies.

Each (shape, dtype, setting) runs in a fresh process, the settings alternating
``--rounds`` times, so a drift of the machine falls on both. fp32 rows are a control:
the setting touches only bf16 and fp16. The native path can take seconds a step on
such a CPU: the default is one shape and a few steps.

    python -m benchmarks.half_gemm [--shapes T4096-D512-F256-E64-K2 ...]
                                   [--dtypes bf16 fp32] [--steps 5] [--rounds 2]
                                   [--shared-experts 0] [--write-results]
"""
import functools
import statistics

from benchmarks.side_by_side import peak_mib, step_times, two_setting_table

VARIABLE = "DSV3_CPU_HALF_GEMM"
SETTINGS = {"fp32 copies": "fp32", "native": "native"}  # DSV3_CPU_HALF_GEMM
DEFAULT_SHAPES = ["T4096-D512-F256-E64-K2"]
DEFAULT_STEPS = 5


def measure(shape: str, dtype: str, steps: int, rounds: int, n_shared: int = 0) -> dict:
    times = {setting: [] for setting in SETTINGS}
    for _ in range(rounds):
        for setting in SETTINGS:
            times[setting] += step_times(VARIABLE, SETTINGS[setting], shape, dtype, steps,
                                         n_shared)
    # benchmarks/memory.py builds the layer without shared experts: no peak for those
    return {"shape": shape + (f" + {n_shared} shared" if n_shared else ""), "dtype": dtype,
            **{s: {"median_ms": statistics.median(times[s]),
                   "peak_mib": None if n_shared
                   else peak_mib(VARIABLE, SETTINGS[s], shape, dtype)}
               for s in SETTINGS}}


def table(rows: list[dict]) -> str:
    return two_setting_table(rows, tuple(SETTINGS), "peak_mib", "peak MiB")


def machine_notes() -> str:
    import torch
    return (f"; torch's native CPU matmul here: bf16 "
            f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}, fp16 "
            f"{torch.ops.mkldnn._is_mkldnn_fp16_supported()} (CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}); peak: one step in a fresh process "
            f"(benchmarks/memory.py)")


def main(argv=None) -> None:
    from benchmarks import side_by_side
    args = side_by_side.parse(__doc__.split("\n\n")[0], argv, ["bf16", "fp32"],
                              DEFAULT_SHAPES, DEFAULT_STEPS, shared_experts=True)
    side_by_side.run(args, functools.partial(measure, n_shared=args.shared_experts), table, machine_notes(), "CPU half-precision GEMMs through "
                     "fp32 copies against torch's native ones", "benchmarks.half_gemm", argv)


if __name__ == "__main__":
    main()
