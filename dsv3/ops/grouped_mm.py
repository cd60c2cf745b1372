"""``dsv3::grouped_mm``: one matmul per expert over its contiguous rows of x_SX,
with dgrad (a grouped_mm against the transposed weights) and wgrad; and
``dsv3::grouped_mm_gather``, the same with the permute fused into its loads: it
reads token rows of x_TX through the routing map, so the expert-ordered copy x_SX
is neither written nor saved for the backward (S = T·K rows of memory saved).

Weights may be passed as a transposed view (``w_EYX.transpose(1, 2)``, i.e.
nn.Linear's [out, in] layout); wgrad then writes its result directly in that
layout, so the parameter's gradient needs no extra copy.
"""
import torch

from dsv3 import reference
from dsv3.ops.backend import use_reference
from dsv3.ops.permute import invert_row_map
from dsv3.ops.checks import (FLOAT_DTYPES, check_no_forward_ad, check_tensor,
                              refuse_double_backward)


@torch.library.register_fake("dsv3::grouped_mm")
def _grouped_mm_fake(x_SX, w_EXY, offsets_E):
    return x_SX.new_empty(x_SX.shape[0], w_EXY.shape[2])


@torch.library.register_fake("dsv3::grouped_mm_gather")
def _grouped_mm_gather_fake(x_TX, w_EXY, offsets_E, token_S, row_map_TK):
    return x_TX.new_empty(token_S.shape[0], w_EXY.shape[2])


@torch.library.register_fake("dsv3::grouped_mm_wgrad")
def _grouped_mm_wgrad_fake(x_SX, grad_y_SY, offsets_E, transposed, token_S=None):
    n_experts, dim_x, dim_y = offsets_E.shape[0], x_SX.shape[1], grad_y_SY.shape[1]
    shape = (n_experts, dim_y, dim_x) if transposed else (n_experts, dim_x, dim_y)
    return x_SX.new_empty(shape)


def _is_transposed_layout(w_EXY: torch.Tensor) -> bool:
    return not w_EXY.is_contiguous() and w_EXY.transpose(1, 2).is_contiguous()


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _weight_grad(x, grad_y_SY, w_EXY, offsets_E, token_S=None):
    transposed = _is_transposed_layout(w_EXY)
    grad_w = torch.ops.dsv3.grouped_mm_wgrad(x, grad_y_SY, offsets_E, transposed, token_S)
    return grad_w.transpose(1, 2) if transposed else grad_w


def _grouped_mm_backward(ctx, grad_y_SY):
    x_SX, w_EXY, offsets_E = ctx.saved_tensors
    grad_x_SX = grad_w_EXY = None
    if ctx.needs_input_grad[0]:
        grad_x_SX = torch.ops.dsv3.grouped_mm(grad_y_SY, w_EXY.transpose(1, 2), offsets_E)
    if ctx.needs_input_grad[1]:
        grad_w_EXY = _weight_grad(x_SX, grad_y_SY, w_EXY, offsets_E)
    return grad_x_SX, grad_w_EXY, None


torch.library.register_autograd("dsv3::grouped_mm", _grouped_mm_backward,
                                setup_context=_grouped_mm_setup)


def _grouped_mm_gather_backward(ctx, grad_y_SY):
    x_TX, w_EXY, offsets_E, token_S, row_map_TK = ctx.saved_tensors
    grad_x_TX = grad_w_EXY = None
    if ctx.needs_input_grad[0]:
        # d(x) per copy, then each token's copies summed in k order (deterministic).
        grad_x_SX = torch.ops.dsv3.grouped_mm(grad_y_SY, w_EXY.transpose(1, 2), offsets_E)
        grad_x_TX = torch.ops.dsv3.unpermute(grad_x_SX, row_map_TK, None)
    if ctx.needs_input_grad[1]:
        grad_w_EXY = _weight_grad(x_TX, grad_y_SY, w_EXY, offsets_E, token_S)
    return grad_x_TX, grad_w_EXY, None, None, None


torch.library.register_autograd("dsv3::grouped_mm_gather", _grouped_mm_gather_backward,
                                setup_context=_grouped_mm_setup)
refuse_double_backward("dsv3::grouped_mm_wgrad", "grouped_mm/gather_grouped_mm")


def _check_grouped_mm(op: str, x_name: str, x, w_EXY, offsets_E) -> None:
    check_tensor(op, x_name, x, dim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "w_EXY", w_EXY, dim=3, dtypes=(x.dtype,), like=x)
    check_tensor(op, "offsets_E", offsets_E, dim=1, dtypes=(torch.int32,), like=x)
    if w_EXY.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: w_EXY must have X={x.shape[1]} ({x_name}'s last dim) as dim 1, "
                         f"got shape {tuple(w_EXY.shape)}")
    if offsets_E.shape[0] != w_EXY.shape[0]:
        raise ValueError(f"{op}: offsets_E must have E={w_EXY.shape[0]} entries, "
                         f"got {offsets_E.shape[0]}")
    check_no_forward_ad(op, x, w_EXY)


def grouped_mm(x_SX: torch.Tensor, w_EXY: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """y_SY[rows of e] = x_SX[rows of e] @ w_EXY[e], where expert e owns rows
    [offsets_E[e-1], offsets_E[e]) (offsets_E int32 cumulative ends, as
    ``torch._grouped_mm``). Rows past offsets_E[-1] come out zero."""
    _check_grouped_mm("grouped_mm", "x_SX", x_SX, w_EXY, offsets_E)
    if use_reference(x_SX):
        return reference.grouped_mm(x_SX, w_EXY, offsets_E)
    return torch.ops.dsv3.grouped_mm(x_SX, w_EXY, offsets_E)


def gather_grouped_mm(x_TX: torch.Tensor, w_EXY: torch.Tensor, offsets_E: torch.Tensor,
                      row_map_TK: torch.Tensor) -> torch.Tensor:
    """``grouped_mm(permute_rows(x_TX, row_map_TK), w_EXY, offsets_E)`` without
    writing the permuted copy: each tile loads its token rows of x_TX directly.
    ``offsets_E`` and ``row_map_TK`` come from ``expert_index``. Differentiable
    w.r.t. x_TX and w_EXY; saves x_TX (which the caller keeps anyway), not x_SX."""
    op = "gather_grouped_mm"
    _check_grouped_mm(op, "x_TX", x_TX, w_EXY, offsets_E)
    check_tensor(op, "row_map_TK", row_map_TK, dim=2, dtypes=(torch.int32,), like=x_TX)
    n_tokens, top_k = row_map_TK.shape
    if n_tokens != x_TX.shape[0]:
        raise ValueError(f"{op}: row_map_TK must have one row per token of x_TX "
                         f"({x_TX.shape[0]}), got {n_tokens}")
    # Row s of the GEMM copies token token_S[s]: row_map_TK inverted on the device,
    # and checked on every backend: the kernels reject an unmapped row's -1, but not in
    # the dropped copies' rows, which they never read.
    token_S = invert_row_map(op, row_map_TK)
    if use_reference(x_TX):
        return reference.grouped_mm(x_TX[token_S.long()], w_EXY, offsets_E)
    return torch.ops.dsv3.grouped_mm_gather(x_TX, w_EXY, offsets_E, token_S, row_map_TK)
