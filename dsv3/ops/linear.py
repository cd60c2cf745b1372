"""``router_logits``: the router's logits in fp32 (fp64 for an fp64 layer) whatever
the layer's dtype, with a backward in the layer's dtype.

Expert choices are made on these logits, and in bf16 near-equal scores tie and flip,
so the forward stays fp32: exact products and fp32 sums of the bf16 values. Their
gradient only feeds x's and the router weight's, which a bf16/fp16 layer (or one
under autocast) holds in bf16 anyway. Computed in that dtype, as every other matmul's
gradient is under mixed precision, the backward's two GEMMs run at bf16 speed (on
the CPU 4x the fp32 ones: 0.3 against 1.3 ms each at T=4096, D=512, E=64), and the
fp32 copy of x that ``F.linear`` kept for the weight's gradient (4 bytes per token
and model dimension, in every MoE layer) is not kept: x itself is. On a CPU without
native bf16/fp16 GEMMs (AVX2 only: there they ran 20-100x slower than fp32) the two
GEMMs take fp32 copies instead, as the CPU grouped GEMMs do (csrc/cpu/half_gemm.h,
``DSV3_CPU_HALF_GEMM``). An fp32 or fp64 layer takes ``F.linear`` as before.
"""
import torch
import torch.nn.functional as F

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _gemm_dtype(x_TD: torch.Tensor) -> torch.dtype:
    """The backward GEMMs' dtype: x's, or fp32 on a CPU without native half GEMMs. Under
    torch.compile x's: the compiled graph's GEMMs are torch's to place."""
    if x_TD.device.type == "cpu" and not torch.compiler.is_compiling() and \
            torch.ops.dsv3.cpu_half_gemm_in_fp32(x_TD.dtype):
        return torch.float32
    return x_TD.dtype


class _RouterLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, weight_ED: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(x_TD, weight_ED)
        return F.linear(x_TD.to(dtype), weight_ED.to(dtype))

    @staticmethod
    def backward(ctx, grad_TE: torch.Tensor):
        x_TD, weight_ED = ctx.saved_tensors
        dtype = _gemm_dtype(x_TD)
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
