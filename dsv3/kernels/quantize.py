"""Triton block-wise int8 quantization with error feedback, and the fused
dequantize + ordered reduce of several ranks' chunks: the GPU compute of the
compressed all-reduce (dsv3.distributed). Both are memory-bound single passes
over several blocks a program, each block's scale computed in registers.

Rounding is half away from zero, done exactly (as C's round()), so the GPU, the
C++ kernel and the reference agree on every level. To agree to the bit on scales,
residuals and sums too, the GPU must round as the CPU does: divisions are IEEE
(``div_rn``; a plain ``/`` compiles to an approximate one) and multiply-adds are not
fused into FMAs (``enable_fp_fusion=False``), since the reference rounds the product
before the sum. Both were seen failing the bitwise tests on an H200.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _block_ids(BLOCKS: tl.constexpr, WIDE_IDS: tl.constexpr):
    """The program's BLOCKS block ids. In int64 where the last id may pass 2^31 (block_size
    1 on a 2^31-value tensor; a DeepSeek-V3 gate_up_proj holds 3.8G values): in int32 the
    ids wrap negative and the scales are read and written outside their tensor. Only
    then: 64-bit ids nearly double the dequantize kernel's registers (128 -> 245 on sm_90)."""
    first = tl.program_id(0)
    if WIDE_IDS:
        first = first.to(tl.int64)
    return first * BLOCKS + tl.arange(0, BLOCKS)


def _wide_ids(n_blocks: int, blocks: int) -> bool:
    """Whether block ids up to the last program's reach 2^31 (see _block_ids)."""
    return triton.cdiv(n_blocks, blocks) * blocks >= 2**31


@triton.jit
def _quantize_kernel(x_ptr, error_ptr, q_ptr, scales_ptr, new_error_ptr, n, n_blocks,
                     block_size, HAS_ERROR: tl.constexpr, BLOCK: tl.constexpr,
                     BLOCKS: tl.constexpr, WIDE_IDS: tl.constexpr):
    # BLOCKS quantization blocks a program ([BLOCKS, BLOCK] tile, one block a row), for
    # 16-byte accesses; each block's scale comes from its own row.
    blocks = _block_ids(BLOCKS, WIDE_IDS)
    inner = tl.arange(0, BLOCK)
    idx = blocks[:, None].to(tl.int64) * block_size + inner[None, :]
    mask = (inner[None, :] < block_size) & (idx < n) & (blocks[:, None] < n_blocks)
    v = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_ERROR:
        v += tl.load(error_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(v), 1)
    # Counted apart: a max reduction may skip NaN.
    finite = tl.sum(tl.where((v != v) | (tl.abs(v) == float("inf")), 1, 0), 1) == 0
    scale = tl.where(finite, tl.math.div_rn(amax, 127.0), float("nan"))
    # IEEE division (a plain / may be approximate on GPUs): levels must match the CPU's.
    usable = (finite & (scale > 0))[:, None]
    ratio = tl.math.div_rn(tl.where(usable, v, 0.0), tl.where(usable, scale[:, None], 1.0))
    whole = tl.where(ratio < 0, -tl.floor(-ratio), tl.floor(ratio))  # trunc
    half_up = tl.where(tl.abs(ratio - whole) >= 0.5, 1.0, 0.0)
    level = tl.where(usable, whole + tl.where(ratio < 0, -half_up, half_up), 0.0)
    # A denormal scale is rounded: v / scale can pass 127.5, which int8 would wrap.
    level = tl.minimum(tl.maximum(level, -127.0), 127.0)
    tl.store(scales_ptr + blocks, scale, mask=blocks < n_blocks)
    tl.store(q_ptr + idx, level.to(tl.int8), mask=mask)
    # inf/NaN block: NaN scale (AMP's scaler sees it), clean residual.
    tl.store(new_error_ptr + idx, tl.where(finite[:, None], v - level * scale[:, None], 0.0),
             mask=mask)


@triton.jit
def _dequantize_kernel(q_ptr, scales_ptr, out_ptr, n_rows, n, n_blocks, block_size,
                       BLOCK: tl.constexpr, BLOCKS: tl.constexpr, WIDE_IDS: tl.constexpr):
    # BLOCKS quantization blocks a program ([BLOCKS, BLOCK] tile): with one 128-value
    # block a program, each thread moved one int8 (0.66 of HBM bandwidth on an H200).
    blocks = _block_ids(BLOCKS, WIDE_IDS)
    inner = tl.arange(0, BLOCK)
    idx = blocks[:, None].to(tl.int64) * block_size + inner[None, :]
    mask = (inner[None, :] < block_size) & (idx < n) & (blocks[:, None] < n_blocks)
    total = tl.zeros((BLOCKS, BLOCK), dtype=tl.float32)
    # Each row's start by stepping the pointers, in 64 bits: r * n in int32 overflows, at
    # a world of 8, from a 307M-value chunk (a DeepSeek-V3-sized gate_up_proj holds 3.8G).
    q_row, scales_row = q_ptr, scales_ptr
    for r in range(n_rows):  # in order: every rank reduces to the same bits
        scale = tl.load(scales_row + blocks, mask=blocks < n_blocks, other=0.0)
        total += tl.load(q_row + idx, mask=mask, other=0).to(tl.float32) * scale[:, None]
        q_row += n
        scales_row += n_blocks
    tl.store(out_ptr + idx, total, mask=mask)


# Values a program covers (several blocks, so that each thread moves 16-byte pieces).
_QUANTIZE_VALUES = 2048
_DEQUANTIZE_VALUES = 4096


def _within(block_size: int, n: int) -> int:
    """A block longer than the tensor is one block of the tensor's length: the same
    scales and values, and a tile Triton can size (a block_size near 2^63 is not)."""
    return max(min(block_size, n), 1)


def quantize_int8(x_N: torch.Tensor, block_size: int, error_N: torch.Tensor | None):
    n = x_N.numel()
    block_size = _within(block_size, n)
    n_blocks = triton.cdiv(n, block_size)
    x_N = x_N.contiguous()
    q_N = torch.empty(n, device=x_N.device, dtype=torch.int8)
    scales_B = torch.empty(n_blocks, device=x_N.device, dtype=torch.float32)
    new_error_N = torch.empty(n, device=x_N.device, dtype=torch.float32)
    block = triton.next_power_of_2(block_size)
    blocks = max(_QUANTIZE_VALUES // block, 1)
    _quantize_kernel[(triton.cdiv(n_blocks, blocks),)](
        x_N, error_N.contiguous() if error_N is not None else x_N, q_N, scales_B, new_error_N,
        n, n_blocks, block_size, HAS_ERROR=error_N is not None, BLOCK=block, BLOCKS=blocks,
        WIDE_IDS=_wide_ids(n_blocks, blocks), enable_fp_fusion=False)
    return q_N, scales_B, new_error_N


def dequantize_int8(q_RN: torch.Tensor, scales_RB: torch.Tensor, block_size: int) -> torch.Tensor:
    # Contiguous after the reshape too: a strided 1-D view reshapes to a strided view.
    q_RN = (q_RN.reshape(1, -1) if q_RN.dim() == 1 else q_RN).contiguous()
    scales_RB = (scales_RB.reshape(1, -1) if scales_RB.dim() == 1 else scales_RB).contiguous()
    n_rows, n = q_RN.shape
    block_size = _within(block_size, n)
    n_blocks = scales_RB.shape[1]
    sum_N = torch.empty(n, device=q_RN.device, dtype=torch.float32)
    block = triton.next_power_of_2(block_size)
    blocks = max(_DEQUANTIZE_VALUES // block, 1)
    _dequantize_kernel[(triton.cdiv(n_blocks, blocks),)](
        q_RN, scales_RB, sum_N, n_rows, n, n_blocks, block_size, BLOCK=block, BLOCKS=blocks,
        WIDE_IDS=_wide_ids(n_blocks, blocks), enable_fp_fusion=False)
    return sum_N
