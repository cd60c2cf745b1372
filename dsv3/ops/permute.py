"""``dsv3::expert_index``, ``dsv3::permute_rows`` and ``dsv3::unpermute``: moving
token rows into expert-grouped order and back.

``row_map_TK[t, k]`` is the row of ``x_SD`` that holds token t's k-th routed copy.
One map serves both directions: permuting is a scatter through it, unpermuting a
gather through it summed over k in order, so neither direction needs atomics and
both backward passes are the other direction.
"""
import functools
from typing import NamedTuple

import torch

from dsv3 import reference
from dsv3.kernels import device_checks
from dsv3.ops import backend
from dsv3.ops.backend import use_reference
from dsv3.ops.checks import (FLOAT_DTYPES, check_int, check_no_forward_ad, check_tensor,
                              check_tokens, refuse_double_backward)


class PermuteOutput(NamedTuple):
    x_SD: torch.Tensor  # rows grouped by expert, token order kept within an expert
    offsets_E: torch.Tensor  # int32 cumulative segment ends
    row_map_TK: torch.Tensor  # int32


@torch.library.register_fake("dsv3::expert_index")
def _expert_index_fake(experts_TK, n_experts):
    # New tensors are contiguous whatever the inputs' strides, as every kernel returns them.
    return experts_TK.new_empty(n_experts), experts_TK.new_empty(experts_TK.shape)


@torch.library.register_fake("dsv3::permute_rows")
def _permute_rows_fake(x_TD, row_map_TK):
    return x_TD.new_empty(row_map_TK.numel(), x_TD.shape[1])


@torch.library.register_fake("dsv3::unpermute")
def _unpermute_fake(y_SD, row_map_TK, weights_TK):
    return y_SD.new_empty(row_map_TK.shape[0], y_SD.shape[1])


@torch.library.register_fake("dsv3::unpermute_backward")
def _unpermute_backward_fake(grad_y_TD, y_SD, row_map_TK, weights_TK):
    return y_SD.new_empty(y_SD.shape), weights_TK.new_empty(weights_TK.shape)  # contiguous


def _permute_rows_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _permute_rows_backward(ctx, grad_x_SD):
    (row_map_TK,) = ctx.saved_tensors
    return torch.ops.dsv3.unpermute(grad_x_SD, row_map_TK, None), None


torch.library.register_autograd("dsv3::permute_rows", _permute_rows_backward,
                                setup_context=_permute_rows_setup)


def _unpermute_setup(ctx, inputs, output):
    y_SD, row_map_TK, weights_TK = inputs
    ctx.save_for_backward(y_SD, row_map_TK, weights_TK)


def _unpermute_backward(ctx, grad_y_TD):
    y_SD, row_map_TK, weights_TK = ctx.saved_tensors
    if weights_TK is None:
        return torch.ops.dsv3.permute_rows(grad_y_TD, row_map_TK), None, None
    grad_y_SD, grad_weights_TK = torch.ops.dsv3.unpermute_backward(grad_y_TD, y_SD, row_map_TK,
                                                                   weights_TK)
    return grad_y_SD, None, grad_weights_TK


torch.library.register_autograd("dsv3::unpermute", _unpermute_backward,
                                setup_context=_unpermute_setup)
refuse_double_backward("dsv3::unpermute_backward", "unpermute")


def _check_experts(op: str, experts_TK, n_experts) -> None:
    check_tensor(op, "experts_TK", experts_TK, dim=2, dtypes=(torch.int32,))
    check_int(op, "n_experts", n_experts, low=1)


def expert_index(experts_TK: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets_E, row_map_TK) for ``experts_TK`` (int32 ids in [-1, n_experts);
    -1 marks a dropped copy, placed after every expert's rows)."""
    _check_experts("expert_index", experts_TK, n_experts)
    if use_reference(experts_TK):
        return reference.expert_index(experts_TK, n_experts)
    return torch.ops.dsv3.expert_index(experts_TK, n_experts)


def permute(x_TD: torch.Tensor, experts_TK: torch.Tensor, n_experts: int) -> PermuteOutput:
    """Copy each token's row once per routed expert into expert-grouped order.

    Stable: within an expert, copies keep token order. Differentiable w.r.t. x_TD.
    """
    op = "permute"
    check_tensor(op, "x_TD", x_TD, dim=2, dtypes=FLOAT_DTYPES)
    check_tokens(op, "x_TD", x_TD)
    _check_experts(op, experts_TK, n_experts)
    check_tensor(op, "experts_TK", experts_TK, like=x_TD)
    if experts_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"{op}: experts_TK must have one row per token of x_TD "
                         f"({x_TD.shape[0]}), got {experts_TK.shape[0]}")
    check_no_forward_ad(op, x_TD)
    if use_reference(x_TD):
        return PermuteOutput(*reference.permute(x_TD, experts_TK, n_experts))
    offsets_E, row_map_TK = torch.ops.dsv3.expert_index(experts_TK, n_experts)
    return PermuteOutput(torch.ops.dsv3.permute_rows(x_TD, row_map_TK), offsets_E, row_map_TK)


def invert_row_map(op: str, row_map_TK: torch.Tensor) -> torch.Tensor:
    """token_S[row_map_TK[t, k]] = t: the token each routed row copies, checked on the
    way that ``row_map_TK`` is a permutation of [0, T*K), with no host sync (an error on
    the CPU, a device assert on a GPU)."""
    n_tokens, top_k = row_map_TK.shape
    token_T = torch.arange(n_tokens, device=row_map_TK.device, dtype=torch.int32)
    token_S = torch.full((n_tokens * top_k,), -1, device=row_map_TK.device, dtype=torch.int32)
    # scatter_ rejects values out of [0, T*K) (indexing would wrap a negative one), with
    # no extra launch. T*K copies fill the T*K rows only if no two share a row: a row
    # left at -1 means repeats.
    scatter = functools.partial(token_S.scatter_, 0, row_map_TK.flatten().long(),
                                token_T.repeat_interleave(top_k))
    if torch.compiler.is_compiling() or row_map_TK.is_cuda:
        scatter()
    else:
        try:
            scatter()
        except RuntimeError as error:  # name the argument
            raise ValueError(f"{op}: row_map_TK values must be in [0, T*K)") from error
    device_checks.raise_unless((token_S >= 0).all(),
                               f"{op}: row_map_TK must map every copy to a row of its own")
    return token_S


def _check_unpermute(op, y_SD, row_map_TK, weights_TK) -> None:
    check_tensor(op, "y_SD", y_SD, dim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "row_map_TK", row_map_TK, dim=2, dtypes=(torch.int32,), like=y_SD)
    if row_map_TK.numel() != y_SD.shape[0]:
        raise ValueError(f"{op}: y_SD must have T*K={row_map_TK.numel()} rows, got {y_SD.shape[0]}")
    if weights_TK is not None:
        check_tensor(op, "weights_TK", weights_TK, dtypes=FLOAT_DTYPES, like=y_SD)
        if weights_TK.shape != row_map_TK.shape:
            raise ValueError(f"{op}: weights_TK must have shape {tuple(row_map_TK.shape)}, "
                             f"got {tuple(weights_TK.shape)}")
    check_no_forward_ad(op, y_SD, weights_TK)


def unpermute(y_SD: torch.Tensor, row_map_TK: torch.Tensor,
              weights_TK: torch.Tensor | None = None) -> torch.Tensor:
    """y_TD[t] = sum_k weights_TK[t, k] * y_SD[row_map_TK[t, k]], summed in k order in
    fp32 (bitwise identical on repeat). Differentiable w.r.t. y_SD and weights_TK.
    ``row_map_TK`` must be a permutation of [0, T*K) (as ``expert_index`` makes): the
    backward writes each row once, so a row named twice would get one copy's gradient
    and another none."""
    _check_unpermute("unpermute", y_SD, row_map_TK, weights_TK)
    if not backend.on_cpu_kernels(y_SD):  # the C++ kernel checks the map in its own pass
        invert_row_map("unpermute", row_map_TK)
    return _unpermute(y_SD, row_map_TK, weights_TK)


def unpermute_from_expert_index(y_SD: torch.Tensor, row_map_TK: torch.Tensor,
                                weights_TK: torch.Tensor | None = None) -> torch.Tensor:
    """``unpermute`` for a ``row_map_TK`` straight from ``expert_index``, a permutation
    by construction: the layers' path, which skips the permutation check (on a GPU,
    seven small launches per layer)."""
    _check_unpermute("unpermute", y_SD, row_map_TK, weights_TK)
    return _unpermute(y_SD, row_map_TK, weights_TK)


def _unpermute(y_SD, row_map_TK, weights_TK):
    if use_reference(y_SD):
        return reference.unpermute(y_SD, row_map_TK, weights_TK)
    return torch.ops.dsv3.unpermute(y_SD, row_map_TK, weights_TK)
