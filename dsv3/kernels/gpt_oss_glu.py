"""Triton kernels of GPT-OSS's gated activation over the first grouped GEMM's [S, 2F]
output, gate and up interleaved (gate at even columns, up at odd):
a = gate * sigmoid(alpha * gate) * (up + 1) in fp32, and a backward that recomputes the
sigmoid rather than saving it.

Interleaved pairs make the indexing flat: in a contiguous h_S2F, output element
idx = s * F + f reads h at 2 * idx (gate) and 2 * idx + 1 (up), whatever the row. So
each program loads one contiguous run of 2 * BLOCK values (wide, coalesced loads, no
row/column division), splits it into gate and up in registers (reshape to
[BLOCK, 2], tl.split), and the backward joins its two gradients back the same way
for one contiguous store.

With a limit the inputs are first clamped exactly as dsv3/kernels/swiglu.py does
(same helper, same rounding of the limit to the tensor's dtype, same GRAD_AT_LIMIT
convention on the bounds); HAS_LIMIT and GRAD_AT_LIMIT are constexpr, so the
unclamped variant carries no clamp code. Offsets are int64: S * 2F reaches 2^31 at
GPT-OSS-120B's F = 2880 from S = 372k routed rows."""
import math

import torch
import triton
import triton.language as tl

from dsv3.kernels.config import INTERPRET
from dsv3.kernels.swiglu import _clamp, _limit_in, _passes_clamp, check_glu_inputs

_BLOCK = 256 if INTERPRET else 1024  # output elements (gate/up pairs) per program
# 8 warps: 256 threads, each loading 8 fp16/bf16 h values (one 128-bit load) that
# split into the 4 outputs it stores (and the 4 dy it loads), already in the layout of
# that store and load. With 4 warps Triton gives the output's store (and dy's load) 8
# values a thread instead, and converts between the layouts through shared memory
# (sm_90 SASS, benchmarks/sm90_compile_check.py --sass: 4 LDS/STS and a barrier a
# program). fp32, 4 values a 128-bit load, keeps that conversion.
_NUM_WARPS = 8


@triton.jit
def _load_pairs(h_ptr, pid, n_h, BLOCK: tl.constexpr):
    """The program's BLOCK (gate, up) pairs as fp32 (0.0 past the end), and the
    offsets and mask of their 2 * BLOCK values in h."""
    offs_h = pid * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    mask_h = offs_h < n_h
    pairs = tl.load(h_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    gate, up = tl.split(tl.reshape(pairs, (BLOCK, 2)))
    return gate, up, offs_h, mask_h


@triton.jit
def _gpt_oss_glu_kernel(h_ptr, a_ptr, n, n_h, alpha, LIMIT, HAS_LIMIT: tl.constexpr,
                        BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    gate, up, _, _ = _load_pairs(h_ptr, pid, n_h, BLOCK)
    if HAS_LIMIT:
        gate, up = _clamp(gate, up, LIMIT)
    out = gate / (1.0 + tl.exp(-alpha * gate)) * (up + 1.0)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(a_ptr + idx, out.to(a_ptr.dtype.element_ty), mask=idx < n)


@triton.jit
def _gpt_oss_glu_backward_kernel(grad_ptr, h_ptr, grad_h_ptr, n, n_h, alpha, LIMIT,
                                 HAS_LIMIT: tl.constexpr, GRAD_AT_LIMIT: tl.constexpr,
                                 BLOCK: tl.constexpr):
    # With s = sigmoid(alpha g) and t = dy (up + 1): d(up) = dy (g s);
    # d(gate) = t s + t g (1 - s) s alpha, on the clamped g and up; each zero where its
    # input was clamped. Multiplied in torch autograd's order, so overflows give torch's
    # values: t s (1 + alpha g (1 - s)) overflowed alpha g for a large finite alpha, and
    # made inf * 0 = NaN where the sigmoid saturates (torch: a finite gradient).
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    dy = tl.load(grad_ptr + idx, mask=idx < n, other=0.0).to(tl.float32)
    gate, up, offs_h, mask_h = _load_pairs(h_ptr, pid, n_h, BLOCK)
    if HAS_LIMIT:
        gate_in, up_in = _passes_clamp(gate, up, LIMIT, GRAD_AT_LIMIT)
        gate, up = _clamp(gate, up, LIMIT)
    sig = 1.0 / (1.0 + tl.exp(-alpha * gate))
    t = dy * (up + 1.0)
    grad_gate = t * sig + t * gate * (1.0 - sig) * sig * alpha
    grad_up = dy * (gate * sig)  # not (dy * gate) * sig, which overflows to inf * 0
    if HAS_LIMIT:
        grad_gate = tl.where(gate_in, grad_gate, 0.0)
        grad_up = tl.where(up_in, grad_up, 0.0)
    grad_pairs = tl.reshape(tl.join(grad_gate, grad_up), (2 * BLOCK,))
    tl.store(grad_h_ptr + offs_h, grad_pairs.to(grad_h_ptr.dtype.element_ty), mask=mask_h)


def _check_inputs(op: str, h_S2F, alpha: float, limit: float | None, grad_a_SF=None) -> None:
    """The C++ kernel's checks (csrc/cpu/gpt_oss_glu.cpp), for direct torch.ops calls."""
    check_glu_inputs(op, h_S2F, limit, grad_a_SF)
    if not math.isfinite(alpha):
        raise ValueError(f"{op}: alpha must be finite, got {alpha}")


def gpt_oss_glu(h_S2F: torch.Tensor, alpha: float, limit: float | None = None) -> torch.Tensor:
    _check_inputs("gpt_oss_glu", h_S2F, alpha, limit)
    h_S2F = h_S2F.contiguous()
    n_rows, ffn = h_S2F.shape[0], h_S2F.shape[1] // 2
    a_SF = h_S2F.new_empty(n_rows, ffn)
    n = a_SF.numel()
    if n:
        _gpt_oss_glu_kernel[(triton.cdiv(n, _BLOCK),)](
            h_S2F, a_SF, n, h_S2F.numel(), float(alpha), _limit_in(limit, h_S2F.dtype),
            HAS_LIMIT=limit is not None, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return a_SF


def gpt_oss_glu_backward(grad_a_SF: torch.Tensor, h_S2F: torch.Tensor, alpha: float,
                         limit: float | None = None, grad_at_limit: bool = False) -> torch.Tensor:
    _check_inputs("gpt_oss_glu_backward", h_S2F, alpha, limit, grad_a_SF)
    h_S2F = h_S2F.contiguous()
    grad_h_S2F = torch.empty_like(h_S2F)
    n = grad_a_SF.numel()
    if n:
        _gpt_oss_glu_backward_kernel[(triton.cdiv(n, _BLOCK),)](
            grad_a_SF.contiguous().to(h_S2F.dtype), h_S2F, grad_h_S2F, n, h_S2F.numel(),
            float(alpha), _limit_in(limit, h_S2F.dtype), HAS_LIMIT=limit is not None,
            GRAD_AT_LIMIT=limit is not None and grad_at_limit, BLOCK=_BLOCK,
            num_warps=_NUM_WARPS)
    return grad_h_S2F
