"""Triton SwiGLU over the first grouped GEMM's [S, 2F] output: silu(gate) * up in
fp32, and a backward that recomputes the sigmoid rather than saving silu(gate)."""
import torch
import triton
import triton.language as tl

from dsv3.kernels.config import INTERPRET

_BLOCK = 256 if INTERPRET else 1024


@triton.jit
def _swiglu_kernel(h_ptr, a_ptr, n, ffn, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    row, col = idx // ffn, idx % ffn
    gate = tl.load(h_ptr + row * 2 * ffn + col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * 2 * ffn + ffn + col, mask=mask, other=0.0).to(tl.float32)
    out = gate * up / (1.0 + tl.exp(-gate))
    tl.store(a_ptr + idx, out.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(grad_ptr, h_ptr, grad_h_ptr, n, ffn, BLOCK: tl.constexpr):
    # With sig = sigmoid(g): d(up) = dy g sig; d(gate) = dy up sig (1 + g (1 - sig)).
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    row, col = idx // ffn, idx % ffn
    dy = tl.load(grad_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(h_ptr + row * 2 * ffn + col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * 2 * ffn + ffn + col, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-gate))
    out_ty = grad_h_ptr.dtype.element_ty
    tl.store(grad_h_ptr + row * 2 * ffn + col, (dy * up * sig * (1.0 + gate * (1.0 - sig))).to(out_ty),
             mask=mask)
    tl.store(grad_h_ptr + row * 2 * ffn + ffn + col, (dy * gate * sig).to(out_ty), mask=mask)


def swiglu(h_S2F: torch.Tensor) -> torch.Tensor:
    h_S2F = h_S2F.contiguous()
    n_rows, ffn = h_S2F.shape[0], h_S2F.shape[1] // 2
    a_SF = h_S2F.new_empty(n_rows, ffn)
    _swiglu_kernel[(triton.cdiv(n_rows * ffn, _BLOCK),)](h_S2F, a_SF, n_rows * ffn, ffn, BLOCK=_BLOCK)
    return a_SF


def swiglu_backward(grad_a_SF: torch.Tensor, h_S2F: torch.Tensor) -> torch.Tensor:
    h_S2F = h_S2F.contiguous()
    grad_h_S2F = torch.empty_like(h_S2F)
    n = grad_a_SF.numel()
    _swiglu_backward_kernel[(triton.cdiv(n, _BLOCK),)](
        grad_a_SF.contiguous().to(h_S2F.dtype), h_S2F, grad_h_S2F, n, h_S2F.shape[1] // 2,
        BLOCK=_BLOCK)
    return grad_h_S2F
