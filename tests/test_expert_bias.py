"""ops.add_expert_bias (the per-expert biases of GPT-OSS's projections) against a loop over
experts: output and both gradients, on routings with empty experts, one hot expert and
dropped copies (rows past offsets_E[-1]); every way of summing the bias gradient gives
the same sums; bad arguments are named."""
import pytest
import torch

from conftest import (DEVICES, DTYPES, TRITON_INTERPRETED, assert_close_to_reference, check_op,
                      make_experts)

from dsv3 import ops
from dsv3.ops import expert_bias

PATTERNS = ("random", "empty", "one_expert", "dropped")


def _reference(y_SN, bias_EN, offsets_E):
    """Each expert's rows, one expert at a time."""
    out_SN = y_SN.clone()
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        out_SN[start:end] = y_SN[start:end] + bias_EN[e]
        start = end
    return out_SN


def _inputs(pattern, dtype, device, n_tokens=37, n_experts=6, top_k=2, width=24):
    experts_TK = make_experts(n_tokens, n_experts, top_k, pattern, device)
    offsets_E, _ = ops.expert_index(experts_TK, n_experts)
    y_SN = torch.randn(n_tokens * top_k, width, device=device, dtype=dtype)
    bias_EN = torch.randn(n_experts, width, device=device, dtype=dtype)
    return y_SN, bias_EN, offsets_E


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_matches_loop_over_experts(pattern, dtype, device):
    y_SN, bias_EN, offsets_E = _inputs(pattern, dtype, device)
    if pattern == "dropped":
        assert offsets_E[-1] < y_SN.shape[0], "no row past the last expert's: nothing tested"
    outs, grads = check_op(ops.add_expert_bias, _reference, [y_SN, bias_EN, offsets_E],
                           differentiable=(0, 1))
    if pattern in ("empty", "one_expert"):  # an expert with no rows gets a zero gradient
        counts_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1))
        assert (counts_E == 0).any()
        assert (grads[1][counts_E == 0] == 0).all()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_sum_agrees(pattern):
    """The GPU kernels' sum (the grouped wgrad with ones), the CPU kernel's row sums and
    the reference path's index_add_."""
    y_SN, bias_EN, offsets_E = _inputs(pattern, torch.float32, "cpu", n_tokens=300)
    expert_S = expert_bias._expert_of_row(offsets_E, y_SN.shape[0])
    grad_SN = torch.randn_like(y_SN)
    by_index = expert_bias._bias_grad(grad_SN, offsets_E, expert_S, 6, by_gemm=False)
    by_gemm = expert_bias._bias_grad(grad_SN, offsets_E, expert_S, 6, by_gemm=True)
    by_rows = torch.ops.dsv3.expert_row_sums(grad_SN, offsets_E)
    torch.testing.assert_close(by_gemm, by_index, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_rows, by_index, rtol=1e-5, atol=1e-5)
    want = torch.stack([grad_SN[expert_S == e].double().sum(0) for e in range(6)]).float()
    torch.testing.assert_close(by_index, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_bias_grad_is_deterministic(device):
    y_SN, bias_EN, offsets_E = _inputs("random", torch.float32, device, n_tokens=2048)
    bias_EN.requires_grad_()
    grad_SN = torch.randn_like(y_SN)
    runs = [torch.autograd.grad(ops.add_expert_bias(y_SN, bias_EN, offsets_E), bias_EN,
                                grad_SN)[0] for _ in range(3)]
    assert all(torch.equal(run, runs[0]) for run in runs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("by_gemm", [False, True, None])  # None: the op's choice
def test_bf16_bias_grad_of_many_rows_within_plain_pytorch(by_gemm, device):
    """The bias gradient sums each expert's rows in fp32, as torch's own bf16 sum does:
    over 16k rows an expert (a long GEMM reduction, where a bf16 GEMM may split K and
    add the partial sums in bf16), its error against fp64 is at most 2x that of
    torch's bf16 sum, plus the floor. The upstream gradient has a mean, so the sums
    grow with the row count."""
    if by_gemm is not False and TRITON_INTERPRETED:  # None there: the op's choice, the GEMM
        pytest.skip("Triton's interpreter computes bf16 dots wrongly")
    n_experts, n_rows, width = 4, 65536, 64
    gen = torch.Generator().manual_seed(4)
    grad_SN = (torch.randn(n_rows, width, generator=gen) + 1.0).to(torch.bfloat16)
    offsets_E = torch.arange(1, n_experts + 1, dtype=torch.int32) * (n_rows // n_experts)
    expert_S = expert_bias._expert_of_row(offsets_E, n_rows)
    got = expert_bias._bias_grad(grad_SN.to(device), offsets_E.to(device), expert_S.to(device),
                                 n_experts, by_gemm)
    rows = grad_SN.view(n_experts, -1, width)
    assert_close_to_reference(got, rows.double().sum(1), rows.sum(1), "bias grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs_and_a_long_row(dtype):
    """Transposed (column-major) y and bias, and rows wider than the CPU kernel's column
    block: the same values as contiguous ones."""
    y_SN, bias_EN, offsets_E = _inputs("dropped", dtype, "cpu", width=300)
    y_cm, bias_cm = y_SN.t().contiguous().t(), bias_EN.t().contiguous().t()
    torch.testing.assert_close(ops.add_expert_bias(y_cm, bias_cm, offsets_E),
                               _reference(y_SN, bias_EN, offsets_E), rtol=0, atol=0)
    grad_SN = torch.randn_like(y_SN)
    want = expert_bias._bias_grad(grad_SN, offsets_E, None, 6, by_gemm=False)
    torch.testing.assert_close(torch.ops.dsv3.expert_row_sums(grad_SN.t().contiguous().t(),
                                                              offsets_E), want)


def test_fp64_gradcheck():
    y_SN, bias_EN, offsets_E = _inputs("dropped", torch.float64, "cpu", n_tokens=7, width=5)
    assert torch.autograd.gradcheck(ops.add_expert_bias,
                                    (y_SN.requires_grad_(), bias_EN.requires_grad_(), offsets_E))


def test_compiles_without_graph_breaks():
    y_SN, bias_EN, offsets_E = _inputs("random", torch.float32, "cpu")
    bias_EN.requires_grad_()
    compiled = torch.compile(ops.add_expert_bias, fullgraph=True, dynamic=False)
    got = compiled(y_SN, bias_EN, offsets_E)
    torch.testing.assert_close(got, _reference(y_SN, bias_EN.detach(), offsets_E))
    grad_SN = torch.randn_like(got)
    (want_grad,) = torch.autograd.grad(ops.add_expert_bias(y_SN, bias_EN, offsets_E), bias_EN,
                                       grad_SN)
    (grad,) = torch.autograd.grad(got, bias_EN, grad_SN)
    torch.testing.assert_close(grad, want_grad)


def test_bad_arguments_are_named():
    y_SN, bias_EN, offsets_E = _inputs("random", torch.float32, "cpu")
    cases = [
        ((y_SN.flatten(), bias_EN, offsets_E), ValueError, "y_SN must be 2-D"),
        ((y_SN.long(), bias_EN, offsets_E), TypeError, "y_SN must have dtype"),
        ((y_SN, bias_EN.double(), offsets_E), TypeError, "bias_EN must have dtype"),
        ((y_SN, bias_EN[:, :5], offsets_E), ValueError, "bias_EN must have N=24"),
        ((y_SN, bias_EN[:4], offsets_E), ValueError, "offsets_E must have E=4"),
        ((y_SN, bias_EN[:0], offsets_E[:0]), ValueError, "bias_EN must have at least one"),
        ((y_SN, bias_EN, offsets_E.long()), TypeError, "offsets_E must have dtype"),
        ((y_SN, "bias", offsets_E), TypeError, "bias_EN must be a torch.Tensor"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            ops.add_expert_bias(*args)
