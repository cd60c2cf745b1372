"""Registers the Triton kernels (dsv3/kernels) as the CUDA implementations of the
dsv3 ops that have no compiled CUDA kernel (csrc/cuda) and, under ``DSV3_BACKEND=triton``, as their CPU implementations too
(replacing the C++ kernels, so that with ``TRITON_INTERPRET=1`` the whole op API
and ``dsv3.MoE`` run through Triton on CPU tensors). Autograd formulas and fake
impls are shared with the C++ path: only the kernels change.

Imported by dsv3.ops only when triton is installed.
"""
import functools
import warnings

import torch

from dsv3 import reference
from dsv3.kernels import (config, gpt_oss_glu, grouped_gemm, permute, quantize, router,
                          router_backward, swiglu)
from dsv3.ops import backend
from dsv3.ops.backend import selected_backend

TRITON_KERNELS = {
    "dsv3::route": router.route,
    "dsv3::route_backward": router_backward.route_backward,
    "dsv3::permute_rows": permute.permute_rows,
    "dsv3::unpermute": permute.unpermute,
    "dsv3::unpermute_backward": permute.unpermute_backward,
    "dsv3::grouped_mm": grouped_gemm.grouped_mm,
    "dsv3::grouped_mm_gather": grouped_gemm.grouped_mm_gather,
    "dsv3::grouped_mm_wgrad": grouped_gemm.grouped_mm_wgrad,
    "dsv3::quantize_int8": quantize.quantize_int8,
    "dsv3::dequantize_int8": quantize.dequantize_int8,
    "dsv3::swiglu": swiglu.swiglu,
    "dsv3::swiglu_backward": swiglu.swiglu_backward,
    "dsv3::gpt_oss_glu": gpt_oss_glu.gpt_oss_glu,
    "dsv3::gpt_oss_glu_backward": gpt_oss_glu.gpt_oss_glu_backward,
}
# Kernels in plain device-side torch ops, for CUDA builds without csrc/cuda.
CUDA_ONLY_KERNELS = {"dsv3::expert_index": reference.expert_index}


def on_tensors_device(kernel):
    """``kernel`` launched on its tensors' GPU. Triton launches on the current device,
    not the tensors' (csrc/cuda's kernels take a CUDAGuard): a layer on cuda:1 while
    cuda:0 is current (transformers' device_map="auto", several GPUs in one process)
    would otherwise launch against the wrong device."""
    @functools.wraps(kernel)
    def launch(*args, **kwargs):
        device = next((a.device for a in args if getattr(a, "is_cuda", False)), None)
        if device is None or device.index == torch.cuda.current_device():
            return kernel(*args, **kwargs)
        with torch.cuda.device(device):
            return kernel(*args, **kwargs)
    return launch


def register() -> None:
    for name, kernel in {**TRITON_KERNELS, **CUDA_ONLY_KERNELS}.items():
        # Ops with a compiled CUDA kernel (csrc/cuda, when built with CUDA) keep it.
        if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"):
            torch.library.register_kernel(name, "cuda", on_tensors_device(kernel))
    if selected_backend() == "triton":
        backend.triton_on_cpu = True
        with warnings.catch_warnings():  # replacing the C++ CPU kernels is the point here
            warnings.simplefilter("ignore")
            for name, kernel in TRITON_KERNELS.items():
                torch.library.register_kernel(name, "cpu", on_cpu_interpreted(kernel))


def on_cpu_interpreted(kernel):
    """``kernel`` for CPU tensors, which only Triton's interpreter can run: without it
    Triton fails deep inside with "0 active drivers", which names neither setting."""
    @functools.wraps(kernel)
    def launch(*args, **kwargs):
        if not config.INTERPRET:
            raise RuntimeError("DSV3_BACKEND=triton runs the Triton kernels on CPU tensors only "
                               "under Triton's interpreter: set TRITON_INTERPRET=1 too, or use "
                               "DSV3_BACKEND=auto for the C++ CPU kernels")
        return kernel(*args, **kwargs)
    return launch
