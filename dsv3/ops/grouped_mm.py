"""``dsv3::grouped_mm``: one matmul per expert over its contiguous rows of x_SX,
with dgrad (a grouped_mm against the transposed weights) and wgrad.

Weights may be passed as a transposed view (``w_EYX.transpose(1, 2)``, i.e.
nn.Linear's [out, in] layout); wgrad then writes its result directly in that
layout, so the parameter's gradient needs no extra copy.
"""
import torch

from dsv3 import reference
from dsv3.ops.backend import use_reference
from dsv3.ops.checks import FLOAT_DTYPES, check_tensor


@torch.library.register_fake("dsv3::grouped_mm")
def _grouped_mm_fake(x_SX, w_EXY, offsets_E):
    return x_SX.new_empty(x_SX.shape[0], w_EXY.shape[2])


@torch.library.register_fake("dsv3::grouped_mm_wgrad")
def _grouped_mm_wgrad_fake(x_SX, grad_y_SY, offsets_E, transposed):
    n_experts, dim_x, dim_y = offsets_E.shape[0], x_SX.shape[1], grad_y_SY.shape[1]
    shape = (n_experts, dim_y, dim_x) if transposed else (n_experts, dim_x, dim_y)
    return x_SX.new_empty(shape)


def _is_transposed_layout(w_EXY: torch.Tensor) -> bool:
    return not w_EXY.is_contiguous() and w_EXY.transpose(1, 2).is_contiguous()


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad_y_SY):
    x_SX, w_EXY, offsets_E = ctx.saved_tensors
    grad_x_SX = grad_w_EXY = None
    if ctx.needs_input_grad[0]:
        grad_x_SX = torch.ops.dsv3.grouped_mm(grad_y_SY, w_EXY.transpose(1, 2), offsets_E)
    if ctx.needs_input_grad[1]:
        transposed = _is_transposed_layout(w_EXY)
        grad_w_EXY = torch.ops.dsv3.grouped_mm_wgrad(x_SX, grad_y_SY, offsets_E, transposed)
        if transposed:
            grad_w_EXY = grad_w_EXY.transpose(1, 2)
    return grad_x_SX, grad_w_EXY, None


torch.library.register_autograd("dsv3::grouped_mm", _grouped_mm_backward,
                                setup_context=_grouped_mm_setup)


def grouped_mm(x_SX: torch.Tensor, w_EXY: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """y_SY[rows of e] = x_SX[rows of e] @ w_EXY[e], where expert e owns rows
    [offsets_E[e-1], offsets_E[e]) (offsets_E int32 cumulative ends, as
    ``torch._grouped_mm``). Rows past offsets_E[-1] come out zero."""
    op = "grouped_mm"
    check_tensor(op, "x_SX", x_SX, dim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "w_EXY", w_EXY, dim=3, dtypes=(x_SX.dtype,), like=x_SX)
    check_tensor(op, "offsets_E", offsets_E, dim=1, dtypes=(torch.int32,), like=x_SX)
    if w_EXY.shape[1] != x_SX.shape[1]:
        raise ValueError(f"{op}: w_EXY must have X={x_SX.shape[1]} (x_SX's last dim) as dim 1, "
                         f"got shape {tuple(w_EXY.shape)}")
    if offsets_E.shape[0] != w_EXY.shape[0]:
        raise ValueError(f"{op}: offsets_E must have E={w_EXY.shape[0]} entries, "
                         f"got {offsets_E.shape[0]}")
    if use_reference(x_SX):
        return reference.grouped_mm(x_SX, w_EXY, offsets_E)
    return torch.ops.dsv3.grouped_mm(x_SX, w_EXY, offsets_E)
