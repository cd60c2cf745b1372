"""The MoE layer's two dense matmuls that are not expert GEMMs: ``router_logits``, the
router's logits in fp32 (fp64 for an fp64 layer) whatever the layer's dtype, with a
backward in the layer's dtype; and ``HalfLinear``, the shared experts' projections: an
nn.Linear (hooks, PEFT and state dicts see one) that on a CPU without native bf16/fp16
matmul multiplies fp32 copies.

Expert choices are made on the router's logits, and in bf16 near-equal scores tie and
flip, so that forward stays fp32: exact products and fp32 sums of the bf16 values.
Their gradient only feeds x's and the router weight's, which a bf16/fp16 layer (or
one under autocast) holds in bf16 anyway. Computed in that dtype, as every other
matmul's gradient is under mixed precision, the backward's two GEMMs run at bf16
speed (on an AVX512 CPU 4x the fp32 ones: 0.3 against 1.3 ms each at T=4096, D=512,
E=64), and the fp32 copy of x that ``F.linear`` kept for the weight's gradient (4
bytes per token and model dimension, in every MoE layer) is not kept: x itself is.
An fp32 or fp64 layer takes ``F.linear`` as before.

On a CPU that torch has no native bf16/fp16 matmul for (AVX2: there it ran 20-100x
slower than fp32), every GEMM here takes fp32 copies of its operands and rounds the
result to the layer's dtype, as the CPU grouped GEMMs do (csrc/cpu/half_gemm.h,
``DSV3_CPU_HALF_GEMM``); still only the half-precision tensors are kept for the
backward. Under torch.compile the GEMMs stay as written: the compiled graph's are
torch's to place.
"""
import torch
import torch.nn.functional as F
from torch import nn

from dsv3.ops import backend
from dsv3.ops.grouped_mm import grouped_mm

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _cpu_gemms_in_fp32(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in _LOW_PRECISION
            and not torch.compiler.is_compiling()
            and torch.ops.dsv3.cpu_half_gemm_in_fp32(x.dtype))


class _RouterLogits(torch.autograd.Function):
    """fp32 (fp64) logits; the backward's GEMMs in x's dtype, or fp32 on a CPU without
    native half GEMMs. Saves x and the weight as given (no copies)."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, weight_ED: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(x_TD, weight_ED)
        return F.linear(x_TD.to(dtype), weight_ED.to(dtype))

    @staticmethod
    def backward(ctx, grad_TE: torch.Tensor):
        x_TD, weight_ED = ctx.saved_tensors
        dtype = torch.float32 if _cpu_gemms_in_fp32(x_TD) else x_TD.dtype
        grad_x = grad_weight = None
        # the dtypes as chosen here, whatever autocast region the backward runs in
        with torch.autocast(x_TD.device.type, enabled=False):
            g_TE = grad_TE.to(dtype)
            if ctx.needs_input_grad[0]:
                grad_x = (g_TE @ weight_ED.to(dtype)).to(x_TD.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = (g_TE.t() @ x_TD.to(dtype)).to(weight_ED.dtype)
        return grad_x, grad_weight, None


def router_logits(x_TD: torch.Tensor, weight_ED: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """``x_TD @ weight_ED.T`` computed in ``dtype`` (fp32 or fp64); its gradients in
    x's dtype where that is bf16 or fp16 (see the module docstring)."""
    if x_TD.dtype not in _LOW_PRECISION:  # F.linear's own backward is that already
        return F.linear(x_TD.to(dtype), weight_ED.to(dtype))
    return _RouterLogits.apply(x_TD, weight_ED, dtype)


def half_linear(x_TD: torch.Tensor, weight_OD: torch.Tensor) -> torch.Tensor:
    """``F.linear(x_TD, weight_OD)`` (2-D x, no bias), through fp32 copies where x is
    bf16/fp16 on a CPU without native half GEMMs: there a grouped GEMM of one expert,
    whose CPU kernel multiplies the copies and hands back x's dtype (so selective
    checkpointing, which keeps matmul outputs, keeps that, not an fp32 product).
    Elsewhere ``F.linear`` itself. A weight of another dtype is taken only under
    autocast, rounded to x's dtype first as autocast would."""
    if not _cpu_gemms_in_fp32(x_TD) or backend.triton_on_cpu or (
            weight_OD.dtype != x_TD.dtype and not torch.is_autocast_enabled("cpu")):
        return F.linear(x_TD, weight_OD)
    weight_1DO = weight_OD.to(x_TD.dtype).t().unsqueeze(0)  # grouped_mm's [E, X, Y]
    offsets_1 = torch.full((1,), x_TD.shape[0], dtype=torch.int32)
    return grouped_mm(x_TD, weight_1DO, offsets_1)


class HalfLinear(nn.Linear):
    """An ``nn.Linear`` whose bf16/fp16 matmul on a CPU without native half GEMMs
    multiplies fp32 copies (``half_linear``); everywhere else, and with a bias, plain
    ``nn.Linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None or not _cpu_gemms_in_fp32(x):
            return super().forward(x)
        y = half_linear(x.reshape(-1, self.in_features), self.weight)
        return y.view(*x.shape[:-1], self.out_features)
