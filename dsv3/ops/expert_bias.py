"""``add_expert_bias``: each expert's bias added to its rows of a grouped GEMM's output,
for experts whose projections carry biases (GPT-OSS's).

Composed of torch ops rather than a kernel of its own: the add is one elementwise
pass, and the bias gradient, a sum over each expert's rows, is small next to the
GEMMs around it. The gradient is computed without atomics (deterministic, as the
rest of the layer) and without a host sync (CUDA-graph capturable): on a GPU as a
matmul of the rows' one-hot expert map with the gradient, on the CPU as an fp32
index_add_, both accumulating in fp32.
"""
import torch

from dsv3.ops.checks import FLOAT_DTYPES, check_no_forward_ad, check_tensor


def _expert_of_row(offsets_E: torch.Tensor, n_rows: int) -> torch.Tensor:
    """int64 [S]: the expert owning each row; E for rows past offsets_E[-1]."""
    rows_S = torch.arange(n_rows, device=offsets_E.device, dtype=offsets_E.dtype)
    return torch.searchsorted(offsets_E, rows_S, right=True)


class _AddExpertBias(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_SN, bias_EN, offsets_E):
        n_experts = bias_EN.shape[0]
        expert_S = _expert_of_row(offsets_E, y_SN.shape[0])
        ctx.save_for_backward(expert_S)
        ctx.n_experts = n_experts
        # Rows past offsets_E[-1] (copies dropped by a capacity limit) belong to no
        # expert: they keep their value (as grouped_mm leaves them, zero), by a zero bias
        # row E appended, rather than a where() over [S, N]: one gather and one add, the
        # fewest passes over [S, N] eager torch can do.
        bias_E1N = torch.cat([bias_EN, bias_EN.new_zeros(1, bias_EN.shape[1])])
        return y_SN + bias_E1N.index_select(0, expert_S)

    @staticmethod
    def backward(ctx, grad_SN):
        (expert_S,) = ctx.saved_tensors
        grad_y_SN = grad_bias_EN = None
        if ctx.needs_input_grad[0]:
            grad_y_SN = grad_SN
        if ctx.needs_input_grad[1]:
            grad_bias_EN = _bias_grad(grad_SN, expert_S, ctx.n_experts)
        return grad_y_SN, grad_bias_EN, None


def _bias_grad(grad_SN: torch.Tensor, expert_S: torch.Tensor, n_experts: int,
               by_matmul: bool | None = None) -> torch.Tensor:
    """sum of grad_SN over each expert's rows, [E, N], accumulated in fp32: by a matmul
    (``by_matmul``; by default off the CPU) or an index_add_."""
    if by_matmul is None:
        by_matmul = grad_SN.device.type != "cpu"
    if not by_matmul:
        # index_add_ on the CPU runs row after row: deterministic, O(S * N).
        sums_EN = grad_SN.new_zeros(n_experts + 1, grad_SN.shape[1], dtype=torch.float32)
        sums_EN.index_add_(0, expert_S, grad_SN.float())
        return sums_EN[:n_experts].to(grad_SN.dtype)
    # On a GPU index_add_ adds with float atomics, whose order varies from run to run.
    # A matmul with the 0/1 map of which expert owns each row sums in a fixed order:
    # 2*E*S*N FLOPs, a few percent of the expert GEMMs' 2*S*D*N per pass for D >> E.
    # In fp32, inputs and all: a bf16/fp16 GEMM may add its split-K partial sums in
    # bf16/fp16 (torch's allow_{bf16,fp16}_reduced_precision_reduction, on by default,
    # and the S-long reduction invites split-K). Under allow_tf32 the fp32 GEMM rounds
    # its inputs to TF32, which holds bf16 and fp16 values exactly (0/1 too).
    experts_E1 = torch.arange(n_experts, device=grad_SN.device).unsqueeze(1)
    owner_ES = (expert_S.unsqueeze(0) == experts_E1).float()
    return (owner_ES @ grad_SN.float()).to(grad_SN.dtype)


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
    return _AddExpertBias.apply(y_SN, bias_EN, offsets_E.contiguous())
