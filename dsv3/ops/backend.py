"""Chooses which implementation an op call runs, in one place for every op.

``DSV3_BACKEND`` selects it:
- ``auto`` (default): the dispatcher routes by device: CPU tensors to the C++
  kernels, CUDA tensors to the Triton kernels (when triton is installed);
- ``triton``: the Triton kernels whatever the device (CPU tensors need
  ``TRITON_INTERPRET=1``); ops without a Triton kernel keep their CPU kernel;
- ``reference``: the plain-PyTorch reference path everywhere, to debug a kernel
  against the truth without changing any call site.
Devices without kernels (or CUDA without triton: warned once) take the reference path, and so
does float64 wherever the Triton kernels would run.
"""
import functools
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "reference", "triton")


def selected_backend() -> str:
    name = os.environ.get("DSV3_BACKEND", "auto").lower()
    if name not in BACKENDS:
        raise ValueError(f"DSV3_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


# Set when the Triton kernels replaced the C++ ones for CPU tensors (DSV3_BACKEND=triton
# at import: the dispatcher's registrations last for the process).
triton_on_cpu = False


def use_reference(tensor: torch.Tensor) -> bool:
    """True when calls on ``tensor`` must take the reference path."""
    if selected_backend() == "reference":
        return True
    # The Triton kernels accumulate in fp32: fp64 (gradcheck, numerics work) would
    # silently get fp32 precision from them, so it takes the exact fp64 torch path.
    if tensor.dtype == torch.float64 and (tensor.device.type == "cuda" or triton_on_cpu):
        return True
    if tensor.device.type == "cuda":
        if triton_available():
            return False
        _warn_reference_fallback()
        return True
    return tensor.device.type != "cpu"


def on_cpu_kernels(tensor: torch.Tensor) -> bool:
    """True when calls on ``tensor`` take the C++ CPU kernels (not Triton's on CPU
    tensors, nor the reference path)."""
    return tensor.device.type == "cpu" and not triton_on_cpu and not use_reference(tensor)


@functools.cache
def _warn_reference_fallback() -> None:
    """Once a process: CUDA tensors without triton run every op in plain PyTorch,
    several times slower than the kernels, which a user would otherwise not know."""
    warnings.warn("dsv3: triton is not installed, so ops on CUDA tensors take the plain "
                  "PyTorch reference path (correct, but without dsv3's kernels); "
                  "pip install triton to use them", RuntimeWarning, stacklevel=3)


def native_cpu_half_matmul(dtype: torch.dtype) -> bool:
    """Whether torch multiplies ``dtype`` (bf16 or fp16) CPU matrices with oneDNN's
    native kernels, as at::mm decides: on CPUs without them (AVX2) it falls back to a
    loop many times slower than fp32 (csrc/cpu/half_gemm.h)."""
    query = {torch.bfloat16: "_is_mkldnn_bf16_supported",
             torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    return bool(getattr(torch.ops.mkldnn, query)())
