"""The dsv3 operators: ``torch.library`` custom ops under the ``dsv3`` namespace.

Importing this package loads the compiled kernels (``dsv3._C``, which registers
the op schemas and the CPU implementations) and then the Python side of each op:
input checks, fake implementations for torch.compile and autograd formulas; and,
where triton is installed, the Triton kernels (see ops/triton_backend.py).
"""
import torch  # (first: loads libc10/libtorch, which dsv3._C links against)

import dsv3._C  # noqa: F401  (registers the dsv3:: ops)
from dsv3.ops.backend import triton_available
from dsv3.ops.expert_bias import add_expert_bias
from dsv3.ops.gpt_oss_glu import gpt_oss_glu
from dsv3.ops.grouped_mm import gather_grouped_mm, grouped_mm
from dsv3.ops.permute import PermuteOutput, expert_index, permute, unpermute
from dsv3.ops.quantize import Quantized, dequantize_int8, quantize_int8
from dsv3.ops.route import SCORES, RouteOutput, RouteStatsOutput, route, route_with_stats
from dsv3.ops.swiglu import swiglu

# Whether dsv3._C was built with its CUDA kernels (dsv3 --version says), asked before the
# Triton backend registers CUDA kernels of its own in Python for the ops lacking one.
CUDA_KERNELS_BUILT = torch._C._dispatch_has_kernel_for_dispatch_key("dsv3::expert_index", "CUDA")

if triton_available():
    from dsv3.ops import triton_backend

    triton_backend.register()



def release_cached_memory() -> int:
    """Free the CPU kernels' cache of large output buffers (kept for reuse across
    steps, capped by DSV3_CPU_CACHE_MB); returns the bytes released."""
    return torch.ops.dsv3.release_cached_memory()


__all__ = ["release_cached_memory", "route", "RouteOutput", "route_with_stats",
           "RouteStatsOutput", "SCORES", "expert_index", "permute", "PermuteOutput",
           "unpermute", "grouped_mm", "gather_grouped_mm", "add_expert_bias", "swiglu",
           "gpt_oss_glu", "quantize_int8", "dequantize_int8", "Quantized"]
