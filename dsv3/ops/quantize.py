"""``dsv3::quantize_int8`` and ``dsv3::dequantize_int8``: block-wise int8
quantization with error feedback, and the dequantize + ordered sum of several
ranks' quantized chunks. They carry gradients *as data* for the compressed
all-reduce (dsv3.distributed), so they have no autograd formula."""
from typing import NamedTuple

import torch

from dsv3 import reference
from dsv3.ops.backend import use_reference
from dsv3.ops.checks import FLOAT_DTYPES, check_int, check_tensor


class Quantized(NamedTuple):
    q_N: torch.Tensor  # int8 levels in [-127, 127]
    scales_B: torch.Tensor  # fp32, one per block: max |value| / 127
    error_N: torch.Tensor  # fp32, what q * scale misses (the next call's error feedback)


@torch.library.register_fake("dsv3::quantize_int8")
def _quantize_fake(x_N, block_size, error_N):
    n_blocks = -(-x_N.numel() // block_size)
    return (x_N.new_empty(x_N.numel(), dtype=torch.int8),
            x_N.new_empty(n_blocks, dtype=torch.float32),
            x_N.new_empty(x_N.numel(), dtype=torch.float32))


@torch.library.register_fake("dsv3::dequantize_int8")
def _dequantize_fake(q_RN, scales_RB, block_size):
    return q_RN.new_empty(q_RN.shape[-1], dtype=torch.float32)


def _refuse_grad(op: str, **tensors) -> None:
    """Without an autograd formula torch's fallback gave the outputs a grad_fn that only
    warns "silently incorrect" on backward: a tensor that needs a gradient is refused."""
    if not torch.is_grad_enabled():  # no graph is built: nothing to warn about
        return
    for name, tensor in tensors.items():
        if tensor is not None and tensor.requires_grad:
            raise TypeError(f"{op}: {name} requires grad, but the quantization has no "
                            f"gradient (it carries gradients as data): pass "
                            f"{name}.detach()")


def quantize_int8(x_N: torch.Tensor, block_size: int = 256,
                  error_N: torch.Tensor | None = None) -> Quantized:
    """Quantize the 1-D ``x_N`` (+ ``error_N``, the previous residual) to int8 with
    one fp32 scale per ``block_size`` values; returns the levels, the scales and the
    new residual. A block holding inf or NaN gets a NaN scale (it dequantizes to NaN,
    so an AMP grad scaler still sees the overflow and skips the step) and a zero
    residual (the overflow does not poison later steps through the error feedback)."""
    op = "quantize_int8"
    check_tensor(op, "x_N", x_N, dim=1, dtypes=FLOAT_DTYPES)
    check_int(op, "block_size", block_size, low=1)
    if x_N.numel() == 0:
        raise ValueError(f"{op}: x_N must not be empty")
    if error_N is not None:
        check_tensor(op, "error_N", error_N, dim=1, dtypes=(torch.float32,), like=x_N)
        if error_N.shape != x_N.shape:
            raise ValueError(f"{op}: error_N must have shape {tuple(x_N.shape)}, "
                             f"got {tuple(error_N.shape)}")
    _refuse_grad(op, x_N=x_N, error_N=error_N)
    if use_reference(x_N):
        return Quantized(*reference.quantize_int8(x_N, block_size, error_N))
    return Quantized(*torch.ops.dsv3.quantize_int8(x_N, block_size, error_N))


def dequantize_int8(q_RN: torch.Tensor, scales_RB: torch.Tensor, block_size: int = 256
                    ) -> torch.Tensor:
    """fp32 sum over the rows of ``q_RN`` [R, N] (or one row [N]) of levels times
    their block's scale, added in row order (the same bits on every rank)."""
    op = "dequantize_int8"
    check_tensor(op, "q_RN", q_RN, dtypes=(torch.int8,))
    check_tensor(op, "scales_RB", scales_RB, dtypes=(torch.float32,), like=q_RN)
    _refuse_grad(op, scales_RB=scales_RB)
    check_int(op, "block_size", block_size, low=1)
    if q_RN.dim() not in (1, 2) or scales_RB.dim() != q_RN.dim():
        raise ValueError(f"{op}: q_RN and scales_RB must both be 1-D or both 2-D, got shapes "
                         f"{tuple(q_RN.shape)} and {tuple(scales_RB.shape)}")
    n_blocks = -(-q_RN.shape[-1] // block_size)
    want = (*q_RN.shape[:-1], n_blocks)
    if tuple(scales_RB.shape) != want:
        raise ValueError(f"{op}: scales_RB must have shape {want} for q_RN {tuple(q_RN.shape)} "
                         f"and block_size {block_size}, got {tuple(scales_RB.shape)}")
    if use_reference(q_RN):
        return reference.dequantize_int8(q_RN, scales_RB, block_size)
    return torch.ops.dsv3.dequantize_int8(q_RN, scales_RB, block_size)
