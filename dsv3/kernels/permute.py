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

from dsv3.kernels.config import INTERPRET

_BLOCK_D = 64 if INTERPRET else 512


@triton.jit
def _permute_rows_kernel(x_ptr, row_map_ptr, out_ptr, dim, top_k, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < dim
    row = tl.load(x_ptr + token.to(tl.int64) * dim + cols, mask=mask)
    for k in range(top_k):
        dest = tl.load(row_map_ptr + token * top_k + k).to(tl.int64)
        tl.store(out_ptr + dest * dim + cols, row, mask=mask)


@triton.jit
def _unpermute_kernel(y_ptr, row_map_ptr, weights_ptr, out_ptr, dim, top_k,
                      HAS_WEIGHTS: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < dim
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in range(top_k):
        src = tl.load(row_map_ptr + token * top_k + k).to(tl.int64)
        row = tl.load(y_ptr + src * dim + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            row = row * tl.load(weights_ptr + token * top_k + k).to(tl.float32)
        acc += row
    tl.store(out_ptr + token.to(tl.int64) * dim + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _unpermute_backward_kernel(grad_ptr, y_ptr, row_map_ptr, weights_ptr, grad_rows_ptr,
                               grad_weights_ptr, dim, top_k, BLOCK_D: tl.constexpr):
    # grad_rows[row_map[t, k]] = w[t, k] * grad[t]; grad_w[t, k] = <grad[t], y[row_map[t, k]]>.
    token = tl.program_id(0)
    for k in range(top_k):
        row = tl.load(row_map_ptr + token * top_k + k).to(tl.int64)
        weight = tl.load(weights_ptr + token * top_k + k).to(tl.float32)
        dot = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = cols < dim
            grad = tl.load(grad_ptr + token.to(tl.int64) * dim + cols, mask=mask, other=0.0)
            grad = grad.to(tl.float32)
            y = tl.load(y_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
            dot += grad * y
            tl.store(grad_rows_ptr + row * dim + cols,
                     (weight * grad).to(grad_rows_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_weights_ptr + token * top_k + k, tl.sum(dot, 0))


def permute_rows(x_TD: torch.Tensor, row_map_TK: torch.Tensor) -> torch.Tensor:
    x_TD, row_map_TK = x_TD.contiguous(), row_map_TK.contiguous()
    n_tokens, dim = x_TD.shape
    x_SD = x_TD.new_empty(row_map_TK.numel(), dim)
    _permute_rows_kernel[(n_tokens, triton.cdiv(dim, _BLOCK_D))](
        x_TD, row_map_TK, x_SD, dim, row_map_TK.shape[1], BLOCK_D=_BLOCK_D)
    return x_SD


def unpermute(y_SD: torch.Tensor, row_map_TK: torch.Tensor, weights_TK: torch.Tensor | None):
    y_SD, row_map_TK = y_SD.contiguous(), row_map_TK.contiguous()
    n_tokens, top_k = row_map_TK.shape
    dim = y_SD.shape[1]
    y_TD = y_SD.new_empty(n_tokens, dim)
    weights = weights_TK.contiguous() if weights_TK is not None else y_SD
    _unpermute_kernel[(n_tokens, triton.cdiv(dim, _BLOCK_D))](
        y_SD, row_map_TK, weights, y_TD, dim, top_k, HAS_WEIGHTS=weights_TK is not None,
        BLOCK_D=_BLOCK_D)
    return y_TD


def unpermute_backward(grad_y_TD, y_SD, row_map_TK, weights_TK):
    y_SD, row_map_TK = y_SD.contiguous(), row_map_TK.contiguous()
    n_tokens, top_k = row_map_TK.shape
    grad_y_SD = torch.empty_like(y_SD)
    grad_weights_TK = torch.empty(n_tokens, top_k, device=y_SD.device, dtype=torch.float32)
    _unpermute_backward_kernel[(n_tokens,)](
        grad_y_TD.contiguous().to(y_SD.dtype), y_SD, row_map_TK, weights_TK.contiguous(),
        grad_y_SD, grad_weights_TK, y_SD.shape[1], top_k, BLOCK_D=_BLOCK_D)
    return grad_y_SD, grad_weights_TK.to(weights_TK.dtype)
