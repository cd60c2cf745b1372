"""Every Triton kernel compiles for the H100/H200 (sm_90) here, with no GPU: a
kernel that only the interpreter has run can still fail Triton's GPU compiler or
ask for more shared memory than the chip has. The grouped GEMM must also reach
Hopper's wgmma tensor-core instructions, or it runs on a much slower path."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DSV3_BACKEND")}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.sm90_compile_check", "--dtypes", "bfloat16"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    gemm_lines = [line for line in result.stdout.splitlines() if "_grouped_mm" in line]
    assert len(gemm_lines) >= 8, report
    assert all("wgmma=True" in line for line in gemm_lines), report
    kernels = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok")}
    assert {"_route_kernel", "_route_backward_kernel", "_permute_rows_kernel", "_unpermute_kernel",
            "_swiglu_kernel", "_quantize_kernel", "_dequantize_kernel"} <= kernels, report
