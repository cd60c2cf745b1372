"""``dsv3::swiglu``: silu(gate) * up over the [S, 2F] output of the first grouped
GEMM, fused. Its backward recomputes the sigmoid from the saved input instead of
saving silu(gate), which keeps the layer's activation memory at the reference's
or below."""
import torch

from dsv3 import reference
from dsv3.ops.backend import use_reference
from dsv3.ops.checks import (FLOAT_DTYPES, check_no_forward_ad, check_tensor,
                              refuse_double_backward)


@torch.library.register_fake("dsv3::swiglu")
def _swiglu_fake(h_S2F):
    return h_S2F.new_empty(h_S2F.shape[0], h_S2F.shape[1] // 2)


@torch.library.register_fake("dsv3::swiglu_backward")
def _swiglu_backward_fake(grad_a_SF, h_S2F):
    return torch.empty_like(h_S2F)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_backward(ctx, grad_a_SF):
    (h_S2F,) = ctx.saved_tensors
    return torch.ops.dsv3.swiglu_backward(grad_a_SF, h_S2F)


torch.library.register_autograd("dsv3::swiglu", _swiglu_backward, setup_context=_swiglu_setup)
refuse_double_backward("dsv3::swiglu_backward", "swiglu")


def swiglu(h_S2F: torch.Tensor) -> torch.Tensor:
    """a_SF = silu(h_S2F[:, :F]) * h_S2F[:, F:] (gate first, then up)."""
    check_tensor("swiglu", "h_S2F", h_S2F, dim=2, dtypes=FLOAT_DTYPES)
    if h_S2F.shape[1] % 2:
        raise ValueError(f"swiglu: h_S2F's last dim must be even (gate and up), "
                         f"got shape {tuple(h_S2F.shape)}")
    check_no_forward_ad("swiglu", h_S2F)
    if use_reference(h_S2F):
        return reference.swiglu(h_S2F)
    return torch.ops.dsv3.swiglu(h_S2F)
