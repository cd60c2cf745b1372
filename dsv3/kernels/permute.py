"""Triton row movement for the MoE layer: the scatter of token rows into
expert-grouped order and the deterministic weighted combine back (a gather per
token summed over k in order, fp32 accumulation: no atomics), with the combine's
backward. ``row_map_TK[t, k]`` is the row of x_SD holding token t's k-th copy.

Building the row map itself (a stable counting sort) is the CUDA kernel in
csrc/cuda/permute.cu.
"""
import torch
import triton
import triton.language as tl

from dsv3.kernels import device_checks
from dsv3.kernels.config import INTERPRET

_BLOCK_D = 64 if INTERPRET else 512


@triton.jit
def _mapped_row(row_map_ptr, ok_ptr, index, n_rows):
    """(row, whether it is in [0, n_rows)) of row_map entry ``index``. An entry out of
    range clears the "row map was good" flag (the launcher raises on it) and its row is
    then neither read nor written."""
    row = tl.load(row_map_ptr + index)
    in_range = (row >= 0) & (row < n_rows)
    tl.store(ok_ptr, 0, mask=~in_range)
    return row.to(tl.int64), in_range


@triton.jit
def _where(flag, block_mask):
    """block_mask where the scalar flag holds. (Not ``block_mask & flag``: triton 3.9's
    interpreter gives that an int32 type, which a load or store mask cannot have.)"""
    return tl.where(flag, block_mask, False)


@triton.jit
def _permute_rows_kernel(x_ptr, row_map_ptr, out_ptr, ok_ptr, n_rows, dim, top_k,
                         BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < dim
    row = tl.load(x_ptr + token.to(tl.int64) * dim + cols, mask=mask)
    for k in range(top_k):
        dest, in_range = _mapped_row(row_map_ptr, ok_ptr, token * top_k + k, n_rows)
        tl.store(out_ptr + dest * dim + cols, row, mask=_where(in_range, mask))


@triton.jit
def _unpermute_kernel(y_ptr, row_map_ptr, weights_ptr, out_ptr, ok_ptr, n_rows, dim, top_k,
                      HAS_WEIGHTS: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < dim
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in range(top_k):
        src, in_range = _mapped_row(row_map_ptr, ok_ptr, token * top_k + k, n_rows)
        row = tl.load(y_ptr + src * dim + cols, mask=_where(in_range, mask), other=0.0)
        row = row.to(tl.float32)
        if HAS_WEIGHTS:
            row = row * tl.load(weights_ptr + token * top_k + k).to(tl.float32)
        acc += row
    tl.store(out_ptr + token.to(tl.int64) * dim + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _unpermute_backward_kernel(grad_ptr, y_ptr, row_map_ptr, weights_ptr, grad_rows_ptr,
                               partial_dots_ptr, ok_ptr, n_rows, dim, top_k,
                               BLOCK_D: tl.constexpr):
    # grad_rows[row_map[t, k]] = w[t, k] * grad[t]; grad_w[t, k] = <grad[t], y[row_map[t, k]]>,
    # here each column block's share of that dot (summed over the blocks by the launcher
    # with torch's sum: the same bits every run). A program per token and column block,
    # as the forward: grad[t]'s block is read once for its K copies, and there are
    # D / BLOCK_D times the programs to keep loads in flight. (The CUDA kernel in that
    # other layout, a block per token walking the whole row for each copy in turn,
    # reached 0.70 of copy bandwidth on an H200, run 4; the forward's layout 0.95.)
    token = tl.program_id(0)
    block = tl.program_id(1)
    cols = block * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < dim
    grad = tl.load(grad_ptr + token.to(tl.int64) * dim + cols, mask=mask, other=0.0)
    grad = grad.to(tl.float32)
    for k in range(top_k):
        copy = token * top_k + k
        row, in_range = _mapped_row(row_map_ptr, ok_ptr, copy, n_rows)
        row_mask = _where(in_range, mask)
        weight = tl.load(weights_ptr + copy).to(tl.float32)
        y = tl.load(y_ptr + row * dim + cols, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(grad_rows_ptr + row * dim + cols,
                 (weight * grad).to(grad_rows_ptr.dtype.element_ty), mask=row_mask)
        tl.store(partial_dots_ptr + copy.to(tl.int64) * tl.num_programs(1) + block,
                 tl.sum(grad * y, 0))


def _check_shapes(op: str, row_map_TK: torch.Tensor, rows_TD: torch.Tensor | None = None,
                  name: str = "", dim: int | None = None, weights_TK=None) -> None:
    """The shape checks of csrc/row_shapes.h: direct torch.ops calls reach the kernels
    without the Python wrappers' checks, and a tensor too small would be read past its end."""
    if row_map_TK.dim() != 2:
        raise ValueError(f"{op}: row_map_TK must be 2-D [T, K], got {tuple(row_map_TK.shape)}")
    n_tokens = row_map_TK.shape[0]
    if rows_TD is not None and (rows_TD.dim() != 2 or rows_TD.shape[0] != n_tokens
                                or (dim is not None and rows_TD.shape[1] != dim)):
        raise ValueError(f"{op}: {name} must be [T={n_tokens}, {'D' if dim is None else dim}] "
                         f"(one row per token of row_map_TK), got {tuple(rows_TD.shape)}")
    if weights_TK is not None and weights_TK.shape != row_map_TK.shape:
        raise ValueError(f"{op}: weights_TK must have row_map_TK's shape "
                         f"{tuple(row_map_TK.shape)}, got {tuple(weights_TK.shape)}")
    if weights_TK is not None and not weights_TK.is_floating_point():
        raise TypeError(f"{op}: weights_TK must be a floating-point tensor, got "
                        f"{weights_TK.dtype}")


def permute_rows(x_TD: torch.Tensor, row_map_TK: torch.Tensor) -> torch.Tensor:
    _check_shapes("permute_rows", row_map_TK, x_TD, "x_TD")
    x_TD, row_map_TK = x_TD.contiguous(), row_map_TK.contiguous()
    n_tokens, dim = x_TD.shape
    x_SD = x_TD.new_empty(row_map_TK.numel(), dim)
    ok = device_checks.good_flags(x_TD.device)
    _permute_rows_kernel[(n_tokens, _column_blocks(dim))](
        x_TD, row_map_TK, x_SD, ok, x_SD.shape[0], dim, row_map_TK.shape[1], BLOCK_D=_BLOCK_D)
    _raise_on_bad_row_map(ok, "permute_rows", x_SD.shape[0])
    return x_SD


def _column_blocks(dim: int) -> int:
    """Programs per token: at least one, so that even rows of zero width check row_map_TK."""
    return max(triton.cdiv(dim, _BLOCK_D), 1)


def _raise_on_bad_row_map(ok: torch.Tensor, op: str, n_rows: int) -> None:
    """The C++ kernel's row_map_TK check, from the flag the kernel cleared."""
    device_checks.raise_unless(ok, f"{op}: row_map_TK values must be in [0, {n_rows})")


def unpermute(y_SD: torch.Tensor, row_map_TK: torch.Tensor, weights_TK: torch.Tensor | None):
    _check_copy_rows("unpermute", y_SD)
    _check_shapes("unpermute", row_map_TK, weights_TK=weights_TK)
    y_SD, row_map_TK = y_SD.contiguous(), row_map_TK.contiguous()
    n_tokens, top_k = row_map_TK.shape
    dim = y_SD.shape[1]
    y_TD = y_SD.new_empty(n_tokens, dim)
    weights = weights_TK.contiguous() if weights_TK is not None else y_SD
    ok = device_checks.good_flags(y_SD.device)
    _unpermute_kernel[(n_tokens, _column_blocks(dim))](
        y_SD, row_map_TK, weights, y_TD, ok, y_SD.shape[0], dim, top_k,
        HAS_WEIGHTS=weights_TK is not None, BLOCK_D=_BLOCK_D)
    _raise_on_bad_row_map(ok, "unpermute", y_SD.shape[0])
    return y_TD


def _check_copy_rows(op: str, y_SD: torch.Tensor) -> None:
    if y_SD.dim() != 2:
        raise ValueError(f"{op}: y_SD must be 2-D [S, D], got {tuple(y_SD.shape)}")


def unpermute_backward(grad_y_TD, y_SD, row_map_TK, weights_TK):
    _check_copy_rows("unpermute_backward", y_SD)
    _check_shapes("unpermute_backward", row_map_TK, grad_y_TD, "grad_y_TD", y_SD.shape[1],
                  weights_TK)
    y_SD, row_map_TK = y_SD.contiguous(), row_map_TK.contiguous()
    n_tokens, top_k = row_map_TK.shape
    grad_y_SD = torch.empty_like(y_SD)
    blocks = _column_blocks(y_SD.shape[1])
    partial_dots_TKB = torch.empty(n_tokens, top_k, blocks, device=y_SD.device,
                                   dtype=torch.float32)
    ok = device_checks.good_flags(y_SD.device)
    _unpermute_backward_kernel[(n_tokens, blocks)](
        grad_y_TD.contiguous().to(y_SD.dtype), y_SD, row_map_TK, weights_TK.contiguous(),
        grad_y_SD, partial_dots_TKB, ok, y_SD.shape[0], y_SD.shape[1], top_k,
        BLOCK_D=_BLOCK_D)
    _raise_on_bad_row_map(ok, "unpermute_backward", y_SD.shape[0])
    return grad_y_SD, partial_dots_TKB.sum(2).to(weights_TK.dtype)
