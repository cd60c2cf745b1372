"""``dsv3::swiglu``: silu(gate) * up over the [S, 2F] output of the first grouped
GEMM, fused, optionally clamped first (GLM-5-Next's and DeepSeek-V4's
``swiglu_limit``). Its backward recomputes the sigmoid (and the clamp) from the saved
input instead of saving silu(gate), which keeps the layer's activation memory at the
reference's or below."""
import torch
from torch.utils._python_dispatch import _disable_current_modes

from dsv3 import reference
from dsv3.ops.backend import use_reference
from dsv3.ops.checks import (FLOAT_DTYPES, check_limit, check_no_forward_ad, check_tensor,
                              refuse_double_backward)


@torch.library.register_fake("dsv3::swiglu")
def _swiglu_fake(h_S2F, limit=None):
    return h_S2F.new_empty(h_S2F.shape[0], h_S2F.shape[1] // 2)


@torch.library.register_fake("dsv3::swiglu_backward")
def _swiglu_backward_fake(grad_a_SF, h_S2F, limit=None, grad_at_limit=False):
    return h_S2F.new_empty(h_S2F.shape)  # contiguous, as the kernels return it


def _clamp_passes_grad_at_limit() -> bool:
    """Whether this torch's clamp gives an input equal to a bound a gradient: it did up to
    torch 2.12 (subgradient 1), and takes the minimum-norm subgradient (0) in 2.14. dsv3
    follows the torch it runs on, so a clamped model has the same gradients on dsv3."""
    # Even if dsv3 is imported under no_grad or inference_mode, a meta default device
    # or a FakeTensorMode (model loading): a real CPU tensor, outside any mode.
    with _disable_current_modes(), torch.inference_mode(False), torch.enable_grad():
        x = torch.ones((), device="cpu", requires_grad=True)
        (grad,) = torch.autograd.grad(x.clamp(max=1.0), x)
        return bool(grad)


# Asked once, at import: the backward formula runs inside traced graphs too.
GRAD_AT_LIMIT = _clamp_passes_grad_at_limit()


def _swiglu_setup(ctx, inputs, output):
    h_S2F, limit = inputs
    ctx.save_for_backward(h_S2F)
    ctx.limit = limit


def _swiglu_backward(ctx, grad_a_SF):
    (h_S2F,) = ctx.saved_tensors
    return torch.ops.dsv3.swiglu_backward(grad_a_SF, h_S2F, ctx.limit, GRAD_AT_LIMIT), None


torch.library.register_autograd("dsv3::swiglu", _swiglu_backward, setup_context=_swiglu_setup)
refuse_double_backward("dsv3::swiglu_backward", "swiglu")


def swiglu(h_S2F: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """a_SF = silu(gate) * up with gate = h_S2F[:, :F], up = h_S2F[:, F:].

    ``limit`` L (a finite number > 0, or None for no clamp) first clamps
    gate = gate.clamp(max=L) and up = up.clamp(-L, L), as GLM-5-Next and DeepSeek-V4
    do, with the semantics of torch's clamp on a tensor of h_S2F's dtype: L is rounded
    to that dtype; the gradient is zero where gate > L or |up| > L and passes where
    gate < L and |up| < L. On the bounds themselves (gate == L, |up| == L) it follows
    the running torch: 1 up to torch 2.12, 0 (the minimum-norm subgradient) in 2.14
    (``GRAD_AT_LIMIT``)."""
    check_tensor("swiglu", "h_S2F", h_S2F, dim=2, dtypes=FLOAT_DTYPES)
    if h_S2F.shape[1] % 2:
        raise ValueError(f"swiglu: h_S2F's last dim must be even (gate and up), "
                         f"got shape {tuple(h_S2F.shape)}")
    limit = check_limit("swiglu", limit, h_S2F.dtype)
    check_no_forward_ad("swiglu", h_S2F)
    if use_reference(h_S2F):
        return reference.swiglu(h_S2F, limit)
    return torch.ops.dsv3.swiglu(h_S2F, limit)
