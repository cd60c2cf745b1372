"""Triton SwiGLU over the first grouped GEMM's [S, 2F] output: silu(gate) * up in
fp32, and a backward that recomputes the sigmoid rather than saving silu(gate).

With a limit (GLM-5-Next's and DeepSeek-V4's clamped SwiGLU) the inputs are first
clamped as torch's clamp on a tensor of their dtype does: with LIMIT = the limit
rounded to that dtype (exact in fp32), gate = min(gate, LIMIT) and
up = clamp(up, -LIMIT, LIMIT). Each gradient is zero where its input was clamped, and
on the bounds themselves unless GRAD_AT_LIMIT (torch 2.12 and before pass it there;
2.14 takes the minimum-norm subgradient, 0). The clamp is a constexpr branch
(HAS_LIMIT): without a limit the kernels compile to the code they were before it existed."""
import functools
import math

import torch
import triton
import triton.language as tl

from dsv3.kernels.config import INTERPRET

_BLOCK = 256 if INTERPRET else 1024


@triton.jit
def _clamp(gate, up, LIMIT):
    # gate = min(gate, LIMIT); up = clamp(up, -LIMIT, LIMIT). NaN stays NaN (its
    # comparisons are false).
    gate = tl.where(gate > LIMIT, LIMIT, gate)
    up = tl.where(up > LIMIT, LIMIT, tl.where(up < -LIMIT, -LIMIT, up))
    return gate, up


@triton.jit
def _passes_clamp(gate, up, LIMIT, GRAD_AT_LIMIT: tl.constexpr):
    # Where the clamp passes a gradient: below LIMIT (gate) or inside +-LIMIT (up), and on
    # the bounds themselves only with GRAD_AT_LIMIT. NaN fails both comparisons: its own
    # gradient is 0, as torch's clamp gives.
    if GRAD_AT_LIMIT:
        return gate <= LIMIT, tl.abs(up) <= LIMIT
    return gate < LIMIT, tl.abs(up) < LIMIT


@triton.jit
def _swiglu_kernel(h_ptr, a_ptr, n, ffn, LIMIT, HAS_LIMIT: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    row, col = idx // ffn, idx % ffn
    gate = tl.load(h_ptr + row * 2 * ffn + col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * 2 * ffn + ffn + col, mask=mask, other=0.0).to(tl.float32)
    if HAS_LIMIT:
        gate, up = _clamp(gate, up, LIMIT)
    # silu(gate) first, as torch: gate * up could overflow to inf where the sigmoid is 0.
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(a_ptr + idx, out.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(grad_ptr, h_ptr, grad_h_ptr, n, ffn, LIMIT, HAS_LIMIT: tl.constexpr,
                            GRAD_AT_LIMIT: tl.constexpr, BLOCK: tl.constexpr):
    # With sig = sigmoid(g): d(up) = dy g sig; d(gate) = dy up sig (1 + g (1 - sig)),
    # on the clamped g and up; each zero where its input was clamped.
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    row, col = idx // ffn, idx % ffn
    dy = tl.load(grad_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(h_ptr + row * 2 * ffn + col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * 2 * ffn + ffn + col, mask=mask, other=0.0).to(tl.float32)
    if HAS_LIMIT:
        gate_in, up_in = _passes_clamp(gate, up, LIMIT, GRAD_AT_LIMIT)
        gate, up = _clamp(gate, up, LIMIT)
    sig = 1.0 / (1.0 + tl.exp(-gate))
    grad_gate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    grad_up = dy * (gate * sig)  # not (dy * gate) * sig, which overflows to inf * 0
    if HAS_LIMIT:
        grad_gate = tl.where(gate_in, grad_gate, 0.0)
        grad_up = tl.where(up_in, grad_up, 0.0)
    out_ty = grad_h_ptr.dtype.element_ty
    tl.store(grad_h_ptr + row * 2 * ffn + col, grad_gate.to(out_ty), mask=mask)
    tl.store(grad_h_ptr + row * 2 * ffn + ffn + col, grad_up.to(out_ty), mask=mask)


def check_glu_inputs(op: str, h_S2F: torch.Tensor, limit: float | None,
                     grad_a_SF: torch.Tensor | None = None) -> None:
    """csrc/cpu/clamp.h's checks, which a direct torch.ops call meets without the Python
    wrappers': the kernels index h by row and column pair, and grad_a_SF beside it."""
    if h_S2F.dim() != 2 or h_S2F.shape[1] % 2:
        raise ValueError(f"{op}: h_S2F must be 2-D [S, 2F] with an even last dim, "
                         f"got {tuple(h_S2F.shape)}")
    if limit is not None and not (math.isfinite(limit) and limit > 0):
        raise ValueError(f"{op}: limit must be a finite number > 0 (or None), got {limit}")
    n_rows, ffn = h_S2F.shape[0], h_S2F.shape[1] // 2
    if grad_a_SF is not None and tuple(grad_a_SF.shape) != (n_rows, ffn):
        raise ValueError(f"{op}: grad_a_SF must be [S, F] = [{n_rows}, {ffn}] for h_S2F of "
                         f"shape {tuple(h_S2F.shape)}, got {tuple(grad_a_SF.shape)}")


@functools.lru_cache(maxsize=64)  # a tensor and .item() each launch: ~2 us
def _limit_in(limit: float | None, dtype: torch.dtype) -> float:
    """``limit`` rounded to ``dtype``, what torch's clamp compares and clamps with
    (0.0, unused, without a limit). On the CPU whatever the default device: on a GPU
    the .item() would be a host sync (breaking CUDA-graph capture)."""
    return 0.0 if limit is None else torch.tensor(limit, dtype=dtype, device="cpu").item()


def swiglu(h_S2F: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    check_glu_inputs("swiglu", h_S2F, limit)
    h_S2F = h_S2F.contiguous()
    n_rows, ffn = h_S2F.shape[0], h_S2F.shape[1] // 2
    a_SF = h_S2F.new_empty(n_rows, ffn)
    _swiglu_kernel[(triton.cdiv(n_rows * ffn, _BLOCK),)](
        h_S2F, a_SF, n_rows * ffn, ffn, _limit_in(limit, h_S2F.dtype), HAS_LIMIT=limit is not None,
        BLOCK=_BLOCK)
    return a_SF


def swiglu_backward(grad_a_SF: torch.Tensor, h_S2F: torch.Tensor, limit: float | None = None,
                    grad_at_limit: bool = False) -> torch.Tensor:
    check_glu_inputs("swiglu_backward", h_S2F, limit, grad_a_SF)
    h_S2F = h_S2F.contiguous()
    grad_h_S2F = torch.empty_like(h_S2F)
    n = grad_a_SF.numel()
    _swiglu_backward_kernel[(triton.cdiv(n, _BLOCK),)](
        grad_a_SF.contiguous().to(h_S2F.dtype), h_S2F, grad_h_S2F, n, h_S2F.shape[1] // 2,
        _limit_in(limit, h_S2F.dtype), HAS_LIMIT=limit is not None,
        GRAD_AT_LIMIT=limit is not None and grad_at_limit, BLOCK=_BLOCK)
    return grad_h_S2F
