"""Compile every Triton kernel for the H100/H200 (sm_90) on a machine without a
GPU, through the same wrappers the ops call, for each dtype and specialization the
GPU tests reach. Device time is scarce (a few minutes per session), so compile
errors, over-large shared memory and the missing use of wgmma are caught here,
before a GPU run.

Triton's launcher is replaced by a compile-only one (``warmup``) under a stand-in
driver that reports an sm_90 target; autotuned kernels compile every config.
Nothing is launched, so outputs are garbage: only compilation is checked.

    python -m benchmarks.sm90_compile_check
"""
import argparse
import sys
import time

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from dsv3.kernels.config import SM90_SHARED_BYTES


class _Sm90Driver:
    """Just enough of Triton's active driver for compilation."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


COMPILED: list[dict] = []


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _ORIGINAL_RUN(self, *args, grid=grid, warmup=True, **kwargs)
    ptx = kernel.asm.get("ptx", "")
    COMPILED.append({
        "kernel": self.__name__,
        "config": {k: v for k, v in kwargs.items() if k.isupper() or k.startswith("num_")},
        "dtypes": sorted({str(a.dtype).removeprefix("torch.") for a in args
                          if isinstance(a, torch.Tensor) and a.is_floating_point()}),
        "shared": kernel.metadata.shared,
        "wgmma": "wgmma.mma_async" in ptx,
    })
    return kernel


def _all_configs(self, *args, **kwargs):
    """Compile every config the autotuner would time, instead of timing them."""
    self.nargs = dict(zip(self.arg_names, args))
    for config in self.prune_configs(kwargs):
        self.fn.run(*args, **kwargs, **config.all_kwargs())


_ORIGINAL_RUN = JITFunction.run


def install() -> None:
    driver.set_active(_Sm90Driver())
    JITFunction.run = _compile_only
    Autotuner.run = _all_configs


def _cases(dtypes):
    from dsv3.kernels import grouped_gemm, permute, quantize, router, swiglu
    for dtype in dtypes:
        for n_tokens, n_experts, top_k, dim, ffn in [(64, 8, 2, 64, 96), (37, 256, 8, 48, 40)]:
            n_rows = n_tokens * top_k
            x = torch.randn(n_tokens, dim, dtype=dtype)
            w = torch.randn(n_experts, dim, ffn, dtype=dtype)
            offsets = torch.linspace(0, n_rows, n_experts, dtype=torch.int32)
            row_map = torch.randperm(n_rows, dtype=torch.int32).reshape(n_tokens, top_k)
            x_rows = torch.randn(n_rows, dim, dtype=dtype)
            token_S = torch.arange(n_rows, dtype=torch.int32) // top_k
            yield "grouped_mm", lambda: grouped_gemm.grouped_mm(x_rows, w, offsets)
            yield "grouped_mm_gather", lambda: grouped_gemm.grouped_mm_gather(
                x, w, offsets, token_S, row_map)
            for transposed in (False, True):
                dy = torch.randn(n_rows, ffn, dtype=dtype)
                yield "grouped_mm_wgrad", lambda: grouped_gemm.grouped_mm_wgrad(
                    x_rows, dy, offsets, transposed)
                yield "grouped_mm_wgrad gather", lambda: grouped_gemm.grouped_mm_wgrad(
                    x, dy, offsets, transposed, token_S)
            weights = torch.rand(n_tokens, top_k, dtype=torch.float32)
            yield "permute_rows", lambda: permute.permute_rows(x, row_map)
            yield "unpermute", lambda: permute.unpermute(x_rows, row_map, weights)
            yield "unpermute no weights", lambda: permute.unpermute(x_rows, row_map, None)
            yield "unpermute_backward", lambda: permute.unpermute_backward(
                x, x_rows, row_map, weights)
            logits = torch.randn(n_tokens, n_experts, dtype=dtype)
            bias = torch.randn(n_experts, dtype=torch.float32)
            for score, groups, stats in [("softmax", (1, 1), True), ("sigmoid", (8, 4), False),
                                         ("sigmoid", (1, 1), True)]:
                groups = groups if n_experts % groups[0] == 0 else (1, 1)
                yield f"route {score}", lambda: router.route(
                    logits, top_k, score, bias if score == "sigmoid" else None, *groups, True,
                    2.5, stats)
                experts = torch.randint(0, n_experts, (n_tokens, top_k), dtype=torch.int32)
                yield f"route_backward {score}", lambda: router.route_backward(
                    weights, torch.randn(n_experts), torch.randn(()), logits, experts, score,
                    True, 2.5)
            h = torch.randn(n_rows, 2 * ffn, dtype=dtype)
            yield "swiglu", lambda: swiglu.swiglu(h)
            yield "swiglu_backward", lambda: swiglu.swiglu_backward(
                torch.randn(n_rows, ffn, dtype=dtype), h)
    flat = torch.randn(5000)
    yield "quantize_int8", lambda: quantize.quantize_int8(flat, 128, torch.zeros(5000))
    q, scales, _ = quantize.quantize_int8(flat, 128, None)
    yield "dequantize_int8", lambda: quantize.dequantize_int8(q.expand(3, -1), scales.expand(3, -1), 128)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    args = parser.parse_args(argv)
    install()
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    failures = 0
    start = time.perf_counter()
    for name, call in _cases(dtypes):
        try:
            call()
        except Exception as error:  # report every failure, not just the first
            failures += 1
            print(f"FAIL {name}: {type(error).__name__}: {str(error)[:400]}")
    for entry in COMPILED:
        too_big = entry["shared"] > SM90_SHARED_BYTES
        failures += too_big
        print(("TOO BIG " if too_big else "ok      ")
              + f"{entry['kernel']:32s} {','.join(entry['dtypes']):18s} shared={entry['shared']:6d} "
              f"wgmma={entry['wgmma']} {entry['config']}")
    print(f"{len(COMPILED)} compilations, {failures} failures, "
          f"{time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
