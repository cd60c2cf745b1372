"""``dsv3::gpt_oss_glu``: GPT-OSS's gated activation (transformers'
``GptOssExperts._apply_gate``) over the [S, 2F] output of the first grouped GEMM,
fused: gate * sigmoid(alpha * gate) * (up + 1), gate and up clamped first by its
``swiglu_limit``. Its own op rather than an option of ``dsv3::swiglu`` because
GPT-OSS's checkpoints interleave gate and up (even and odd columns) where SwiGLU's
take two halves, and its activation has the ``alpha`` slope and the ``+ 1``: in one
pass over interleaved rows, no de-interleaving copy of h. As swiglu's, the backward
recomputes the sigmoid (and the clamp) from the saved input, and the gradient on the
clamp's bounds follows the running torch (``GRAD_AT_LIMIT``, asked once by
dsv3.ops.swiglu)."""
import torch

from dsv3 import reference
from dsv3.ops.backend import use_reference
from dsv3.ops.checks import (FLOAT_DTYPES, check_limit, check_no_forward_ad, check_number,
                              check_tensor, refuse_double_backward)
from dsv3.ops.swiglu import GRAD_AT_LIMIT

# GPT-OSS's swiglu_alpha (transformers' GptOssConfig, the released checkpoints).
GPT_OSS_ALPHA = 1.702


@torch.library.register_fake("dsv3::gpt_oss_glu")
def _gpt_oss_glu_fake(h_S2F, alpha, limit=None):
    return h_S2F.new_empty(h_S2F.shape[0], h_S2F.shape[1] // 2)


@torch.library.register_fake("dsv3::gpt_oss_glu_backward")
def _gpt_oss_glu_backward_fake(grad_a_SF, h_S2F, alpha, limit=None, grad_at_limit=False):
    return h_S2F.new_empty(h_S2F.shape)  # contiguous, as the kernels return it


def _gpt_oss_glu_setup(ctx, inputs, output):
    h_S2F, alpha, limit = inputs
    ctx.save_for_backward(h_S2F)
    ctx.alpha, ctx.limit = alpha, limit


def _gpt_oss_glu_backward(ctx, grad_a_SF):
    (h_S2F,) = ctx.saved_tensors
    grad_h_S2F = torch.ops.dsv3.gpt_oss_glu_backward(grad_a_SF, h_S2F, ctx.alpha, ctx.limit,
                                                     GRAD_AT_LIMIT)
    return grad_h_S2F, None, None


torch.library.register_autograd("dsv3::gpt_oss_glu", _gpt_oss_glu_backward,
                                setup_context=_gpt_oss_glu_setup)
refuse_double_backward("dsv3::gpt_oss_glu_backward", "gpt_oss_glu")


def gpt_oss_glu(h_S2F: torch.Tensor, alpha: float = GPT_OSS_ALPHA,
                limit: float | None = None) -> torch.Tensor:
    """a_SF = gate * sigmoid(alpha * gate) * (up + 1) with gate = h_S2F[:, 0::2] and
    up = h_S2F[:, 1::2] (interleaved, as GPT-OSS lays out gate_up_proj), computed in
    fp32 for fp16/bf16 h_S2F and returned in its dtype.

    ``alpha`` is the sigmoid's slope (a finite number; GPT-OSS's 1.702 by default, any
    sign). ``limit`` L (a finite number > 0, or None for no clamp; GPT-OSS's
    swiglu_limit is 7.0) first clamps gate = gate.clamp(max=L) and
    up = up.clamp(-L, L) with the semantics of torch's clamp on a tensor of h_S2F's
    dtype, exactly as ``swiglu``'s limit: L is rounded to that dtype; the gradient is
    zero where gate > L or |up| > L and passes where gate < L and |up| < L. On the
    bounds themselves it follows the running torch (``GRAD_AT_LIMIT``: 1 up to torch
    2.12, 0 in 2.14). The result matches transformers' ``GptOssExperts._apply_gate``."""
    check_tensor("gpt_oss_glu", "h_S2F", h_S2F, dim=2, dtypes=FLOAT_DTYPES)
    if h_S2F.shape[1] % 2:
        raise ValueError(f"gpt_oss_glu: h_S2F's last dim must be even (gate and up "
                         f"interleaved), got shape {tuple(h_S2F.shape)}")
    check_number("gpt_oss_glu", "alpha", alpha)
    if isinstance(alpha, int):
        alpha = float(alpha)  # the schema's float
    limit = check_limit("gpt_oss_glu", limit, h_S2F.dtype)
    check_no_forward_ad("gpt_oss_glu", h_S2F)
    if use_reference(h_S2F):
        return reference.gpt_oss_glu(h_S2F, alpha, limit)
    return torch.ops.dsv3.gpt_oss_glu(h_S2F, alpha, limit)
