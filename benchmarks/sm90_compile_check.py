"""Compile every Triton kernel for the H100/H200 (sm_90) on a machine without a
GPU, through the same wrappers the ops call, for each dtype and specialization the
GPU tests reach. Device time is scarce (a few minutes per session), so compile
errors, over-large shared memory and the missing use of wgmma are caught here,
before a GPU run.

Triton's launcher is replaced by a compile-only one (``warmup``) under a stand-in
driver that reports an sm_90 target; autotuned kernels compile every config.
Nothing is launched, so outputs are garbage: only compilation is checked.

``--sass`` adds each kernel's static SASS statistics (registers, spills, instruction
counts by class), disassembled from the sm_90 cubin with the nvdisasm that ships with
Triton, so that kernel variants can be compared by their instruction mix without a GPU.

    python -m benchmarks.sm90_compile_check [--sass] [--dtypes bf16]

Progress (each case as it finishes, with the running count of compiled kernels)
goes to stderr; the report to stdout.
"""
import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from dsv3.kernels import device_checks
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
_RECORDED: set[int] = set()
_RECORDING = threading.Lock()


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _ORIGINAL_RUN(self, *args, grid=grid, warmup=True, **kwargs)
    # The autotuner compiles its configs side by side (dsv3/kernels/tuning.py), then
    # runs each: one entry per compiled kernel.
    with _RECORDING:
        if id(kernel) in _RECORDED:
            return kernel
        _RECORDED.add(id(kernel))
    ptx = kernel.asm.get("ptx", "")
    COMPILED.append({
        "kernel": self.__name__,
        "config": {k: v for k, v in kwargs.items() if k.isupper() or k.startswith("num_")},
        "dtypes": sorted({str(a.dtype).removeprefix("torch.") for a in args
                          if isinstance(a, torch.Tensor) and a.is_floating_point()}),
        "shared": kernel.metadata.shared,
        "wgmma": "wgmma.mma_async" in ptx,
        "cubin": kernel.asm["cubin"],
    })
    return kernel


def _all_configs(self, *args, **kwargs):
    """Compile every config the autotuner would time, instead of timing them."""
    self.nargs = dict(zip(self.arg_names, args))
    for config in self.prune_configs(kwargs):
        if config.pre_hook:  # as Autotuner.run: e.g. the TMA descriptors' block shapes
            config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
        self.fn.run(*args, **kwargs, **config.all_kwargs())


_ORIGINAL_RUN = JITFunction.run


def install() -> None:
    driver.set_active(_Sm90Driver())
    JITFunction.run = _compile_only
    Autotuner.run = _all_configs
    # Nothing runs, so the kernels' "input was good" flags hold garbage: not checked.
    device_checks.raise_unless = lambda ok, message: None


# SASS opcodes (the mnemonic before its first '.') counted together in the report.
SASS_CLASSES = {
    "stl": ("STL",),  # stores to local memory: register spills (or a stack array)
    "ldl": ("LDL",),
    "shfl": ("SHFL",),
    "mufu": ("MUFU",),  # exp2, rcp, rsqrt...: the slow special-function unit
    "atom": ("ATOM", "ATOMG", "RED", "REDG"),  # global atomics; shared-memory ATOMS is not one
    # global loads, with the asynchronous copies into shared memory (cp.async, TMA)
    "ldg": ("LDG", "LDGSTS", "UTMALDG"),
    "stg": ("STG", "UTMASTG"),
    "lds/sts": ("LDS", "STS", "LDSM", "STSM"),
    "bar": ("BAR",),
    "gmma": ("HGMMA", "IGMMA", "QGMMA", "BGMMA"),  # Hopper's wgmma
    "hmma": ("HMMA", "IMMA"),  # mma.sync: the pre-Hopper tensor-core path
    "bra": ("BRA",),
}
# "/*0120*/   @!P0 LDC R146, c[0x0][0x238] ;" -> LDC; data lines ("/*0000*/ .byte ...") don't match.
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_]*)",
                          re.MULTILINE)
# The same with the opcode's modifiers: LDG.E.128.
_FULL_OPCODE = re.compile(
    r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)",
    re.MULTILINE)


def _nvidia_tool(name: str) -> str:
    """The CUDA binary that ships with Triton (the version its ptxas belongs to), else PATH's."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    path = str(bundled) if bundled.is_file() else shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} is neither in {bundled.parent} nor on PATH")
    return path


def _disassembled(cubin: bytes) -> tuple[str, str]:
    """(the cubin's SASS, cuobjdump's resource usage)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        # -c: code sections only (its stderr warns of the ELF's format: not an error)
        sass = subprocess.run([_nvidia_tool("nvdisasm"), "-c", file.name], check=True,
                              capture_output=True, text=True).stdout
        # Triton's metadata has no register count (it reads it from the driver at load)
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", file.name], check=True,
                               capture_output=True, text=True).stdout
    return sass, usage


def sass_opcodes(cubin: bytes) -> list[str]:
    """The cubin's instructions in program order, each as its full opcode (LDG.E.128):
    where a load or copy is issued relative to another."""
    sass, _ = _disassembled(cubin)
    return _FULL_OPCODE.findall(sass)


def sass_stats(cubin: bytes) -> dict:
    """Static statistics of a cubin's SASS: registers per thread ("regs"), instructions
    ("sass"), the counts of each of SASS_CLASSES, and every opcode's count ("opcodes")."""
    sass, usage = _disassembled(cubin)
    opcodes = Counter(_INSTRUCTION.findall(sass))
    # one "REG:n" per function in the cubin; Triton's has the kernel alone
    stats = {"regs": max(map(int, re.findall(r"\bREG:(\d+)", usage)), default=0),
             "sass": sum(opcodes.values())}
    stats.update({name: sum(opcodes[op] for op in ops) for name, ops in SASS_CLASSES.items()})
    stats["opcodes"] = dict(opcodes)
    return stats


def _sass_columns(stats: dict) -> str:
    return " ".join(f"{name}={stats[name]:<{5 if name == 'sass' else 3}}"
                    for name in ("regs", "sass", *SASS_CLASSES))


def _cases(dtypes):
    from dsv3.kernels import (gpt_oss_glu, grouped_gemm, permute, quantize, router,
                              router_backward, swiglu)
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
            # nn.Linear's [E, Y, X] weights, as the layer's forward passes them (K-major TMA)
            w_T = torch.randn(n_experts, ffn, dim, dtype=dtype).transpose(1, 2)
            yield "grouped_mm EYX", lambda: grouped_gemm.grouped_mm(x_rows, w_T, offsets)
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
                yield f"route_backward {score}", lambda: router_backward.route_backward(
                    weights, torch.randn(n_experts), torch.randn(()), logits, experts, score,
                    True, 2.5)
            if router._blocks(logits, top_k)["COUNT_BINS"]:
                # Enough tokens for four a thread (router._widened: Mixtral's top-2 of 8).
                many = torch.randn(router._WIDE_MIN_PROGRAMS * 4 * router._TOKENS_PER_PROGRAM,
                                   n_experts, dtype=dtype)
                for score, stats in [("softmax", False), ("softmax", True), ("sigmoid", True)]:
                    yield f"route {score} four tokens a thread", lambda: router.route(
                        many, top_k, score, bias if score == "sigmoid" else None, 1, 1, True,
                        2.5, stats)
            # Groups scored by their best expert (GROUP_MAX, group_score="max"): softmax
            # without a bias, as DeepSeek-V2 routes, and sigmoid with one. The backward
            # does not depend on how experts were chosen: no new variant of it.
            for score in ("softmax", "sigmoid"):
                yield f"route {score} group max", lambda: router.route(
                    logits, top_k, score, bias if score == "sigmoid" else None, 8, 4, True,
                    2.5, False, "max")
            h = torch.randn(n_rows, 2 * ffn, dtype=dtype)
            yield "swiglu", lambda: swiglu.swiglu(h)
            yield "swiglu_backward", lambda: swiglu.swiglu_backward(
                torch.randn(n_rows, ffn, dtype=dtype), h)
            # The clamped variant (HAS_LIMIT), its backward in both conventions at the
            # bounds (GRAD_AT_LIMIT: torch 2.12 and before pass the gradient there).
            yield "swiglu clamped", lambda: swiglu.swiglu(h, 10.0)
            for grad_at_limit in (False, True):
                yield "swiglu_backward clamped", lambda: swiglu.swiglu_backward(
                    torch.randn(n_rows, ffn, dtype=dtype), h, 10.0, grad_at_limit)
            # GPT-OSS's interleaved gate/up (alpha 1.702, swiglu_limit 7): the same variants.
            yield "gpt_oss_glu", lambda: gpt_oss_glu.gpt_oss_glu(h, 1.702)
            yield "gpt_oss_glu_backward", lambda: gpt_oss_glu.gpt_oss_glu_backward(
                torch.randn(n_rows, ffn, dtype=dtype), h, 1.702)
            yield "gpt_oss_glu clamped", lambda: gpt_oss_glu.gpt_oss_glu(h, 1.702, 7.0)
            for grad_at_limit in (False, True):
                yield "gpt_oss_glu_backward clamped", lambda: gpt_oss_glu.gpt_oss_glu_backward(
                    torch.randn(n_rows, ffn, dtype=dtype), h, 1.702, 7.0, grad_at_limit)
    flat = torch.randn(5000)
    yield "quantize_int8", lambda: quantize.quantize_int8(flat, 128, torch.zeros(5000))
    q, scales, _ = quantize.quantize_int8(flat, 128, None)
    yield "dequantize_int8", lambda: quantize.dequantize_int8(q.expand(3, -1), scales.expand(3, -1), 128)


# The short names the other benchmark scripts use, and torch's own.
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
               "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtypes(names: str) -> list[torch.dtype]:
    """"fp32,bf16" (or torch's names, "float32,bfloat16") -> the dtypes, in order."""
    dtypes = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        if name not in DTYPE_NAMES:
            raise argparse.ArgumentTypeError(
                f"unknown dtype {name!r}: give a comma-separated list of "
                f"{', '.join(DTYPE_NAMES)}")
        if DTYPE_NAMES[name] not in dtypes:
            dtypes.append(DTYPE_NAMES[name])
    if not dtypes:
        raise argparse.ArgumentTypeError("no dtype given")
    return dtypes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", type=parse_dtypes, default="fp32,bf16,fp16",
                        help="comma-separated dtypes to compile for: fp32, bf16, fp16 (or "
                             "float32, bfloat16, float16); default: all three")
    parser.add_argument("--sass", action="store_true",
                        help="add registers and SASS instruction counts per kernel")
    args = parser.parse_args(argv)
    install()
    failures = 0
    start = time.perf_counter()
    for case, (name, call) in enumerate(_cases(args.dtypes), 1):
        try:
            call()
        except Exception as error:  # report every failure, not just the first
            failures += 1
            print(f"FAIL {name}: {type(error).__name__}: {str(error)[:400]}", flush=True)
        print(f"compiling: case {case} ({name}) done, {len(COMPILED)} kernels compiled, "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    # The autotuner's threads finish in any order: the report in a fixed one.
    COMPILED.sort(key=lambda entry: (entry["kernel"], entry["dtypes"], sorted(
        (name, str(value)) for name, value in entry["config"].items())))
    if args.sass:  # nvdisasm takes ~0.3 s a kernel: run them side by side
        with ThreadPoolExecutor() as pool:
            stats = list(pool.map(sass_stats, [entry["cubin"] for entry in COMPILED]))
    for i, entry in enumerate(COMPILED):
        too_big = entry["shared"] > SM90_SHARED_BYTES
        failures += too_big
        wgmma = f"{entry['wgmma']!s:5} {_sass_columns(stats[i])}" if args.sass else entry["wgmma"]
        print(("TOO BIG " if too_big else "ok      ")
              + f"{entry['kernel']:32s} {','.join(entry['dtypes']):18s} shared={entry['shared']:6d} "
              f"wgmma={wgmma} {entry['config']}")
    print(f"{len(COMPILED)} compilations, {failures} failures, "
          f"{time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
