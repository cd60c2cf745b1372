"""``add_expert_bias``: each expert's bias added to its rows of a grouped GEMM's output,
for experts whose projections carry biases (GPT-OSS's).

On the CPU, C++ kernels of their own (csrc/cpu/expert_bias.cpp): the add in one pass
into the kernels' cached outputs, the bias gradient as plain row sums. Elsewhere (a
GPU, Triton's kernels on CPU tensors, torch.compile) composed of existing ops: the
forward is one gather and one add. There the bias gradient, a sum over each expert's
rows, is the grouped GEMM's weight gradient with ones for its input (ones_S^T @ grad_SN
per expert): the layer's own wgrad kernels, accumulating in fp32 (on tensor cores in
bf16/fp16), without atomics (deterministic) and without a host sync (CUDA-graph
capturable), at 2*16*S*N FLOPs: the ones are 16 wide, the narrowest operand a GPU
matmul tile takes. fp32 gradients get the layer's fp32 GEMM precision: TF32 inputs
where torch.backends.cuda.matmul.allow_tf32 is set.
"""
import torch

from dsv3.kernels import device_checks
from dsv3.ops import backend
from dsv3.ops.backend import use_reference
from dsv3.ops.checks import FLOAT_DTYPES, check_no_forward_ad, check_tensor

# Width of the ones the bias gradient multiplies with: tl.dot's smallest dimension, and
# 16-byte rows for TMA in every dtype.
_ONES_WIDTH = 16


def _expert_of_row(offsets_E: torch.Tensor, n_rows: int) -> torch.Tensor:
    """int64 [S]: the expert owning each row; E for rows past offsets_E[-1]."""
    rows_S = torch.arange(n_rows, device=offsets_E.device, dtype=offsets_E.dtype)
    return torch.searchsorted(offsets_E, rows_S, right=True)


def _on_cpu_kernels(tensor: torch.Tensor) -> bool:
    """Whether this call takes the C++ kernels: CPU tensors, outside torch.compile (which
    fuses the composed ops itself), unless the Triton or reference path was chosen."""
    return backend.on_cpu_kernels(tensor) and not torch.compiler.is_compiling()


@torch.library.register_fake("dsv3::add_expert_bias")
def _add_expert_bias_fake(y_SN, bias_EN, offsets_E):
    return torch.empty_like(y_SN, memory_format=torch.contiguous_format)


@torch.library.register_fake("dsv3::expert_row_sums")
def _expert_row_sums_fake(grad_SN, offsets_E):
    return grad_SN.new_empty(offsets_E.shape[0], grad_SN.shape[1])


class _AddExpertBias(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_SN, bias_EN, offsets_E):
        n_experts = bias_EN.shape[0]
        ctx.n_experts = n_experts
        if _on_cpu_kernels(y_SN):
            ctx.save_for_backward(None, offsets_E)
            return torch.ops.dsv3.add_expert_bias(y_SN, bias_EN, offsets_E)
        expert_S = _expert_of_row(offsets_E, y_SN.shape[0])
        ctx.save_for_backward(expert_S, offsets_E)
        # Rows past offsets_E[-1] (copies dropped by a capacity limit) belong to no
        # expert: they keep their value (as grouped_mm leaves them, zero), by a zero bias
        # row E appended, rather than a where() over [S, N]: one gather and one add, the
        # fewest passes over [S, N] eager torch can do.
        bias_E1N = torch.cat([bias_EN, bias_EN.new_zeros(1, bias_EN.shape[1])])
        return y_SN + bias_E1N.index_select(0, expert_S)

    @staticmethod
    def backward(ctx, grad_SN):
        expert_S, offsets_E = ctx.saved_tensors
        grad_y_SN = grad_bias_EN = None
        if ctx.needs_input_grad[0]:
            grad_y_SN = grad_SN
        if ctx.needs_input_grad[1]:
            grad_bias_EN = _bias_grad(grad_SN, offsets_E, expert_S, ctx.n_experts)
        return grad_y_SN, grad_bias_EN, None


def _bias_grad(grad_SN: torch.Tensor, offsets_E: torch.Tensor, expert_S: torch.Tensor | None,
               n_experts: int, by_gemm: bool | None = None) -> torch.Tensor:
    """sum of grad_SN over each expert's rows, [E, N], accumulated in fp32 (fp64 for
    fp64): by the C++ row sums on the CPU kernels' path, else by the grouped GEMM's
    wgrad (``by_gemm``; by default wherever the op would run its kernels) or, on the
    reference path, an index_add_ over the rows' experts (``expert_S``)."""
    if by_gemm is None and _on_cpu_kernels(grad_SN):
        return torch.ops.dsv3.expert_row_sums(grad_SN, offsets_E)
    if by_gemm is None:
        by_gemm = not use_reference(grad_SN)
    if by_gemm:
        ones_SX = grad_SN.new_ones(grad_SN.shape[0], _ONES_WIDTH)
        sums_EXN = torch.ops.dsv3.grouped_mm_wgrad(ones_SX, grad_SN.contiguous(), offsets_E,
                                                   False)
        return sums_EXN[:, 0].contiguous()  # every row of the ones gives the same sums
    if expert_S is None:  # the forward took the C++ kernels, which need no row experts
        expert_S = _expert_of_row(offsets_E, grad_SN.shape[0])
    acc = torch.float64 if grad_SN.dtype == torch.float64 else torch.float32
    sums_EN = grad_SN.new_zeros(n_experts + 1, grad_SN.shape[1], dtype=acc)
    sums_EN.index_add_(0, expert_S, grad_SN.to(acc))  # row E: rows past offsets_E[-1]
    return sums_EN[:n_experts].to(grad_SN.dtype)


def add_expert_bias(y_SN: torch.Tensor, bias_EN: torch.Tensor,
                    offsets_E: torch.Tensor) -> torch.Tensor:
    """y_SN[rows of e] + bias_EN[e] for each expert e, where e owns rows
    [offsets_E[e-1], offsets_E[e]) (the int32 cumulative ends of ``expert_index``, as
    ``grouped_mm`` takes them); rows past offsets_E[-1] are returned unchanged.
    Differentiable w.r.t. y_SN and bias_EN (the bias gradient is deterministic)."""
    op = "add_expert_bias"
    check_tensor(op, "y_SN", y_SN, dim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "bias_EN", bias_EN, dim=2, dtypes=(y_SN.dtype,), like=y_SN)
    check_tensor(op, "offsets_E", offsets_E, dim=1, dtypes=(torch.int32,), like=y_SN)
    if bias_EN.shape[1] != y_SN.shape[1]:
        raise ValueError(f"{op}: bias_EN must have N={y_SN.shape[1]} (y_SN's last dim) as "
                         f"dim 1, got shape {tuple(bias_EN.shape)}")
    if offsets_E.shape[0] != bias_EN.shape[0]:
        raise ValueError(f"{op}: offsets_E must have E={bias_EN.shape[0]} entries (bias_EN's "
                         f"rows), got {offsets_E.shape[0]}")
    if bias_EN.shape[0] == 0:
        raise ValueError(f"{op}: bias_EN must have at least one expert, got shape "
                         f"{tuple(bias_EN.shape)}")
    check_no_forward_ad(op, y_SN, bias_EN)
    # The rows' experts come from a binary search, which assumes sorted offsets: bad ones
    # would add other experts' biases silently (the backward's wgrad would refuse them,
    # but only with gradients on). Checked on the device: no host sync on a GPU.
    ends_E = offsets_E.to(torch.int64)
    starts_E = torch.cat([ends_E.new_zeros(1), ends_E[:-1]])
    # The message leaves S out: formatting it would make torch.compile specialize on the
    # row count (a recompile for every token count).
    device_checks.raise_unless(((ends_E >= starts_E) & (ends_E <= y_SN.shape[0])).all(),
                               f"{op}: offsets_E must be non-decreasing and <= S (y_SN's rows)")
    return _AddExpertBias.apply(y_SN, bias_EN, offsets_E.contiguous())
