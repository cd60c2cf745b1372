"""dsv3.ops.gpt_oss_glu against reference.gpt_oss_glu: output and d(h) (gate at even
columns, up at odd), unclamped and clamped (GPT-OSS's swiglu_limit), for several
alphas; and against transformers' GptOssExperts._apply_gate itself."""
import math

import pytest
import torch

from conftest import DEVICES, DTYPES, assert_close, check_op
from dsv3 import ops, reference

ALPHA = 1.702  # GPT-OSS's swiglu_alpha

# (S, F): rows and expert hidden size (h is [S, 2F]).
CASES = [
    # Baseline.
    pytest.param(64, 128, id="baseline"),
    # One row (T = 1, K = 1).
    pytest.param(1, 64, id="one_row"),
    # F = 1: one (gate, up) pair a row.
    pytest.param(7, 1, id="F1"),
    # Odd F = 37 and S = 39: pairs cross Triton's blocks mid-row; not a multiple of the
    # vector width or the 16-row grain.
    pytest.param(39, 37, id="odd_F37_S39"),
    # F = 100 (odd dims as in D = 100).
    pytest.param(17, 100, id="F100"),
    # Medium: several parallel chunks, F past one 512-pair chunk, vector tail of 88.
    pytest.param(200, 600, id="medium"),
]


def glu(alpha=ALPHA, limit=None):
    """The op and the reference as functions of h alone, for check_op."""
    return (lambda h: ops.gpt_oss_glu(h, alpha, limit),
            lambda h: reference.gpt_oss_glu(h, alpha, limit))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S, F", CASES)
def test_gpt_oss_glu_matches_reference(S, F, dtype, device):
    h_S2F = (3 * torch.randn(S, 2 * F, device=device)).to(dtype)
    (a_SF,), _ = check_op(*glu(), [h_S2F], differentiable=(0,))
    assert a_SF.shape == (S, F) and a_SF.dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [
    1.0,  # sigmoid's own slope: a SiLU gate
    0.5,  # a gentler slope
    -1.3,  # negative: sigmoid(alpha * gate) falls as the gate grows
    0.0,  # flat: the gate times one half
])
def test_other_alphas_match_reference(alpha, dtype, device):
    h_S2F = (3 * torch.randn(39, 2 * 37, device=device)).to(dtype)
    check_op(*glu(alpha), [h_S2F], differentiable=(0,))
    check_op(*glu(alpha, 2.0), [h_S2F], differentiable=(0,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("limit", [None, 2.0])
@pytest.mark.parametrize("dtype, alpha", [(torch.float32, 3e38), (torch.float32, -3e38),
                                          (torch.float64, 1e300)])
def test_a_huge_finite_alpha_keeps_the_gate_gradient_finite(dtype, alpha, limit, device):
    """alpha * gate overflows to inf where the sigmoid has saturated (s(1 - s) = 0):
    torch's gradient is finite there. The kernels' s (1 + alpha g (1 - s)) made it
    inf * 0 = NaN; s + g s (1 - s) alpha (torch's order) does not."""
    h_S2F = (3 * torch.randn(5, 2 * 8, device=device)).to(dtype)
    got, want = h_S2F.clone().requires_grad_(), h_S2F.clone().requires_grad_()
    grad_a_SF = torch.randn(5, 8, device=device, dtype=dtype)
    (got_grad,) = torch.autograd.grad(ops.gpt_oss_glu(got, alpha, limit), got, grad_a_SF)
    (want_grad,) = torch.autograd.grad(reference.gpt_oss_glu(want, alpha, limit), want, grad_a_SF)
    assert want_grad.isfinite().all() and got_grad.isfinite().all()
    torch.testing.assert_close(got_grad, want_grad)


def test_fp32_sigmoid_is_as_accurate_as_torch():
    """The C++ kernels' polynomial sigmoid (vec::fast_sigmoid) against torch's fp32 over
    alpha * gate in [-85, 85] (the polynomial's whole range) and a fine grid near 0:
    the output and both gradients at most 2x torch's fp32 error against fp64, plus a
    floor of a few fp32 ulps."""
    gate = torch.cat([torch.linspace(-50, 50, 4001), torch.linspace(-2, 2, 4001)])
    up = torch.linspace(-3, 3, gate.numel())
    h_S2F = torch.stack([gate, up], dim=1).reshape(1, -1)
    for alpha in (ALPHA, -ALPHA):
        ours, theirs, exact = (h_S2F.clone().requires_grad_() for _ in range(3))
        exact_d = exact.detach().double().requires_grad_()
        outs = [ops.gpt_oss_glu(ours, alpha), reference.gpt_oss_glu(theirs, alpha),
                reference.gpt_oss_glu(exact_d, alpha)]
        grads = [torch.autograd.grad(o.sum(), x)[0]
                 for o, x in zip(outs, (ours, theirs, exact_d))]
        for (got, plain, want), what in (((outs[0], outs[1], outs[2]), "output"),
                                         ((grads[0], grads[1], grads[2]), "grad")):
            scale = want.abs().clamp_min(1e-3)  # relative, but not where the value is ~0
            err_ours = ((got.double() - want) / scale).abs().max().item()
            err_torch = ((plain.double() - want) / scale).abs().max().item()
            assert err_ours <= 2 * err_torch + 5e-7, (alpha, what, err_ours, err_torch)


# --- clamped (GPT-OSS's swiglu_limit): gate.clamp(max=L), up.clamp(-L, L) ----------------
# (S, F, L): with h ~ 3 N(0, 1), every limit here clamps a good share of gate and up.
CLAMPED_CASES = [
    # Baseline, L = 2.
    pytest.param(64, 128, 2.0, id="baseline_L2"),
    # One row; GPT-OSS's own limit, 7, clamps the far tail only.
    pytest.param(1, 64, 7.0, id="one_row_L7"),
    # Odd F = 37 and S = 39: the vector tails of the clamped chunks.
    pytest.param(39, 37, 1.0, id="odd_F37_S39_L1"),
    # Medium: several parallel chunks, F past one 512-pair chunk.
    pytest.param(200, 600, 0.5, id="medium_L05"),
]


def straddling(S, F, limit, dtype, device="cpu"):
    """h [S, 2F] ~ 3 N(0, 1) with, in row 0, gates (even columns) and ups (odd) exactly
    at -L, +L and at the neighbouring values of the dtype on each side, so that the
    clamp's bounds are hit and both ways past them."""
    h_S2F = (3 * torch.randn(S, 2 * F)).to(dtype)
    at = torch.tensor([limit, -limit], dtype=dtype)
    edges = torch.cat([at, torch.nextafter(at, at * 2), torch.nextafter(at, at * 0)])
    n = min(F, edges.numel())
    h_S2F[0, 0:2 * n:2] = edges[:n]  # gate
    h_S2F[0, 1:2 * n:2] = edges.flip(0)[:n]  # up
    return h_S2F.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S, F, limit", CLAMPED_CASES)
def test_clamped_gpt_oss_glu_matches_reference(S, F, limit, dtype, device):
    h_S2F = straddling(S, F, limit, dtype, device)
    gate, up = h_S2F.float()[:, 0::2], h_S2F.float()[:, 1::2]
    assert (gate > limit).any() and (up.abs() > limit).any(), "the limit clamps nothing"
    (a_SF,), (grad_h,) = check_op(*glu(ALPHA, limit), [h_S2F], differentiable=(0,))
    assert a_SF.shape == (S, F) and a_SF.dtype == dtype
    # Where the clamp cuts the gradient, it is exactly zero (the comparison's tolerance
    # would let a small leak through): the same zeros as torch's clamp.
    assert (grad_h[:, 0::2][gate > limit] == 0).all()
    assert (grad_h[:, 1::2][up.abs() > limit] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_clamped_at_the_bounds_follows_torch(dtype, device):
    """gate and up exactly at +-L, and one dtype step inside and outside: which gradients
    are zero is exactly what torch's clamp gives (on the bounds themselves whichever
    this torch does), with L = 3 and with L = 1.3, which no dtype holds exactly (torch
    rounds it to the dtype)."""
    for limit in (3.0, 1.3):
        at = torch.tensor([limit, -limit], dtype=dtype)
        values = torch.cat([at, torch.nextafter(at, at * 2), torch.nextafter(at, at * 0),
                            torch.tensor([0.5, -0.5], dtype=dtype)])
        # Every pairing of gate and up values, interleaved.
        gate = values.repeat_interleave(values.numel())
        up = values.repeat(values.numel())
        h_S2F = torch.stack([gate, up], dim=1).reshape(1, -1).to(device)
        got = h_S2F.clone().requires_grad_()
        want = h_S2F.clone().requires_grad_()
        a_SF = ops.gpt_oss_glu(got, ALPHA, limit)
        want_SF = reference.gpt_oss_glu(want, ALPHA, limit)
        torch.testing.assert_close(a_SF, want_SF, rtol=2e-2, atol=1e-2)
        (grad_got,) = torch.autograd.grad(a_SF.sum(), got)
        (grad_want,) = torch.autograd.grad(want_SF.sum(), want)
        assert torch.equal(grad_got == 0, grad_want == 0), f"limit {limit}: zeros differ"
        torch.testing.assert_close(grad_got, grad_want, rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_at_limit", [False, True])
def test_backward_on_the_bounds(grad_at_limit, dtype, device):
    """Both conventions of the backward kernel (the op passes the one of the running
    torch, GRAD_AT_LIMIT): with grad_at_limit an input exactly at +-L passes its
    gradient (torch 2.12 and before), without it it gets 0 (2.14). Against the formula
    written out, with a negative alpha."""
    limit, alpha = 2.0, -0.8
    h_S2F = straddling(16, 8, limit, dtype, device)
    grad_a_SF = torch.randn(16, 8, device=device).to(dtype)
    got = torch.ops.dsv3.gpt_oss_glu_backward(grad_a_SF, h_S2F, alpha, limit, grad_at_limit)
    gate, up = h_S2F.double()[:, 0::2], h_S2F.double()[:, 1::2]
    dy = grad_a_SF.double()
    g, u = gate.clamp(max=limit), up.clamp(-limit, limit)
    s = torch.sigmoid(alpha * g)
    passes_gate = (gate <= limit) if grad_at_limit else (gate < limit)
    passes_up = (up.abs() <= limit) if grad_at_limit else (up.abs() < limit)
    want = torch.stack([torch.where(passes_gate, dy * (u + 1) * s * (1 + alpha * g * (1 - s)), 0.0),
                        torch.where(passes_up, dy * g * s, 0.0)], dim=2).reshape(16, 16)
    assert torch.equal(got == 0, want == 0)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("limit", [None, 2.0])
def test_nan_propagates_as_in_torch(limit, dtype, device):
    """A NaN gate or up makes its output NaN, clamped or not (torch's clamp keeps NaN);
    the gradients are torch's: NaN where the formula meets the NaN, and 0 for a NaN
    input the clamp masks (NaN fails every comparison)."""
    h_S2F = (3 * torch.randn(4, 2 * 6)).to(dtype)
    h_S2F[0, 2] = float("nan")  # gate of pair 1
    h_S2F[1, 5] = float("nan")  # up of pair 2
    h_S2F[2, 6:8] = float("nan")  # both of pair 3
    h_S2F = h_S2F.to(device)
    got, want = h_S2F.clone().requires_grad_(), h_S2F.clone().requires_grad_()
    a_SF, want_SF = ops.gpt_oss_glu(got, ALPHA, limit), reference.gpt_oss_glu(want, ALPHA, limit)
    nan_out = torch.zeros(4, 6, dtype=torch.bool)
    nan_out[0, 1] = nan_out[1, 2] = nan_out[2, 3] = True
    assert torch.equal(a_SF.isnan().cpu(), nan_out)
    assert torch.equal(want_SF.isnan().cpu(), nan_out)
    grad_a_SF = torch.randn(4, 6, device=device).to(dtype)
    (grad_got,) = torch.autograd.grad(a_SF, got, grad_a_SF)
    (grad_want,) = torch.autograd.grad(want_SF, want, grad_a_SF)
    assert torch.equal(grad_got.isnan(), grad_want.isnan())
    torch.testing.assert_close(grad_got, grad_want, rtol=2e-2, atol=2e-2, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("limit", [None, 7.0])
def test_no_rows(limit, device):
    """S = 0 (an expert group that got no rows): empty output and gradient."""
    h_S2F = torch.randn(0, 16, device=device, requires_grad=True)
    a_SF = ops.gpt_oss_glu(h_S2F, ALPHA, limit)
    assert a_SF.shape == (0, 8)
    a_SF.sum().backward()
    assert h_S2F.grad.shape == (0, 16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["row_slice", "column_slice", "transposed"])
def test_non_contiguous_input(layout, device):
    """Strided views of h (not through check_op, whose clone would make the slices
    contiguous), output and the gradient that reaches the underlying tensor."""
    views = {"row_slice": lambda b: b[::2],  # every other row
             "column_slice": lambda b: b[:, 4:28],  # a column window: rows 48 apart
             "transposed": lambda b: b[:, :24].t().contiguous().t()}  # column-major
    base = 3 * torch.randn(20, 48, device=device)
    for limit in (None, 2.0):
        ours, theirs = base.clone().requires_grad_(), base.clone().requires_grad_()
        h_S2F = views[layout](ours)
        assert not h_S2F.is_contiguous()
        a_SF = ops.gpt_oss_glu(h_S2F, ALPHA, limit)
        want_SF = reference.gpt_oss_glu(views[layout](theirs), ALPHA, limit)
        grad_a_SF = torch.randn_like(a_SF)
        a_SF.backward(grad_a_SF)
        want_SF.backward(grad_a_SF)
        assert_close(a_SF, want_SF)
        assert_close(ours.grad, theirs.grad, "grad of h_S2F")


def test_an_int_alpha_and_limit_are_float_ones():
    h_S2F = 3 * torch.randn(5, 8)
    torch.testing.assert_close(ops.gpt_oss_glu(h_S2F, 2, 3), ops.gpt_oss_glu(h_S2F, 2.0, 3.0))


def test_default_alpha_is_gpt_oss():
    h_S2F = 3 * torch.randn(5, 8)
    torch.testing.assert_close(ops.gpt_oss_glu(h_S2F), ops.gpt_oss_glu(h_S2F, 1.702, None))


@pytest.mark.parametrize("limit", [None, 2.0])
def test_gradcheck_and_opcheck(limit):
    h_S2F = 3 * torch.randn(9, 10, dtype=torch.float64)
    for alpha in (ALPHA, -0.7):
        assert torch.autograd.gradcheck(lambda h: ops.gpt_oss_glu(h, alpha, limit),
                                        (h_S2F.clone().requires_grad_(),))
    torch.library.opcheck(torch.ops.dsv3.gpt_oss_glu.default,
                          (3 * torch.randn(18, 8, requires_grad=True), ALPHA, limit))


def test_compiles_without_graph_breaks():
    """The Python checks (alpha, limit) trace under torch.compile(fullgraph=True)."""
    torch._dynamo.reset()
    fn = torch.compile(lambda h: ops.gpt_oss_glu(h, ALPHA, 7.0), fullgraph=True,
                       backend="aot_eager")
    h_S2F = (5 * torch.randn(6, 8)).requires_grad_()
    a_SF = fn(h_S2F)
    a_SF.sum().backward()
    h_ref = h_S2F.detach().clone().requires_grad_()
    want_SF = reference.gpt_oss_glu(h_ref, ALPHA, 7.0)
    want_SF.sum().backward()
    assert_close(a_SF, want_SF)
    assert_close(h_S2F.grad, h_ref.grad)


def test_refuses_double_backward():
    h_S2F = (3 * torch.randn(6, 8)).requires_grad_()
    (grad_h,) = torch.autograd.grad(ops.gpt_oss_glu(h_S2F, ALPHA, 2.0).square().sum(), h_S2F,
                                    create_graph=True)
    with pytest.raises(NotImplementedError, match="gpt_oss_glu: double backward"):
        grad_h.sum().backward()


def test_unclamped_float64_keeps_infinite_inputs_gradients():
    """Without a limit nothing is masked: an infinite gate or up gets torch's gradient
    (a number or NaN), not a clamp's 0."""
    inf = math.inf
    h_S2F = torch.tensor([[1.0, 2.0, inf, -inf, inf, 3.0, -inf, 3.0]], dtype=torch.float64)
    grad_a_SF = torch.ones(1, 4, dtype=torch.float64)
    h_ref = h_S2F.clone().requires_grad_()
    (want,) = torch.autograd.grad(reference.gpt_oss_glu(h_ref, ALPHA), h_ref, grad_a_SF)
    got = torch.ops.dsv3.gpt_oss_glu_backward(grad_a_SF, h_S2F, ALPHA)
    torch.testing.assert_close(got, want, equal_nan=True)


# --- bad arguments: each error names its argument ---------------------------------------
@pytest.mark.parametrize("call, error, message", [
    pytest.param(lambda: ops.gpt_oss_glu([1.0, 2.0]), TypeError,
                 "gpt_oss_glu: h_S2F must be a torch.Tensor, got list", id="h_not_tensor"),
    pytest.param(lambda: ops.gpt_oss_glu(torch.randn(8)), ValueError,
                 r"gpt_oss_glu: h_S2F must be 2-D, got shape \(8,\)", id="h_1d"),
    pytest.param(lambda: ops.gpt_oss_glu(torch.randn(2, 4, 8)), ValueError,
                 "gpt_oss_glu: h_S2F must be 2-D", id="h_3d"),
    pytest.param(lambda: ops.gpt_oss_glu(torch.ones(4, 8, dtype=torch.int32)), TypeError,
                 "gpt_oss_glu: h_S2F must have dtype in", id="h_int"),
    pytest.param(lambda: ops.gpt_oss_glu(torch.randn(4, 7)), ValueError,
                 "gpt_oss_glu: h_S2F's last dim must be even", id="h_odd_last_dim"),
    pytest.param(lambda: ops.gpt_oss_glu(torch.randn(4, 8), True), TypeError,
                 "gpt_oss_glu: alpha must be a number, got bool", id="alpha_bool"),
    pytest.param(lambda: ops.gpt_oss_glu(torch.randn(4, 8), "1.7"), TypeError,
                 "gpt_oss_glu: alpha must be a number, got str", id="alpha_str"),
    pytest.param(lambda: ops.gpt_oss_glu(torch.randn(4, 8), None), TypeError,
                 "gpt_oss_glu: alpha must be a number, got NoneType", id="alpha_none"),
    pytest.param(lambda: ops.gpt_oss_glu(torch.randn(4, 8), torch.tensor(1.7)), TypeError,
                 "gpt_oss_glu: alpha must be a number, got Tensor", id="alpha_tensor"),
    pytest.param(lambda: ops.gpt_oss_glu(torch.randn(4, 8), math.nan), ValueError,
                 "gpt_oss_glu: alpha must be finite", id="alpha_nan"),
    pytest.param(lambda: ops.gpt_oss_glu(torch.randn(4, 8), -math.inf), ValueError,
                 "gpt_oss_glu: alpha must be finite", id="alpha_inf"),
    pytest.param(lambda: ops.gpt_oss_glu(torch.randn(4, 8), ALPHA, 0.0), ValueError,
                 "gpt_oss_glu: limit must be > 0", id="limit_zero"),
    pytest.param(lambda: ops.gpt_oss_glu(torch.randn(4, 8), ALPHA, -2.0), ValueError,
                 "gpt_oss_glu: limit must be > 0", id="limit_negative"),
    pytest.param(lambda: ops.gpt_oss_glu(torch.randn(4, 8), ALPHA, math.inf), ValueError,
                 "gpt_oss_glu: limit must be finite", id="limit_inf"),
    pytest.param(lambda: ops.gpt_oss_glu(torch.randn(4, 8), ALPHA, math.nan), ValueError,
                 "gpt_oss_glu: limit must be finite", id="limit_nan"),
    pytest.param(lambda: ops.gpt_oss_glu(torch.randn(4, 8), ALPHA, "7"), TypeError,
                 "gpt_oss_glu: limit must be a number, got str", id="limit_str"),
    pytest.param(lambda: ops.gpt_oss_glu(torch.randn(4, 8), ALPHA, True), TypeError,
                 "gpt_oss_glu: limit must be a number, got bool", id="limit_bool"),
    pytest.param(lambda: ops.gpt_oss_glu(torch.randn(4, 8), ALPHA, torch.tensor(7.0)), TypeError,
                 "gpt_oss_glu: limit must be a number, got Tensor", id="limit_tensor"),
    # fp16 would round 1e5 to inf (no clamp), where torch's clamp (the reference,
    # transformers' _apply_gate) raises.
    pytest.param(lambda: ops.gpt_oss_glu(torch.randn(4, 8, dtype=torch.float16), ALPHA, 1e5),
                 ValueError, "gpt_oss_glu: limit 100000.0 is past the range of h_S2F's",
                 id="limit_past_fp16"),
])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_arguments_are_named(call, error, message, backend, monkeypatch):
    monkeypatch.setenv("DSV3_BACKEND", backend)
    with pytest.raises(error, match=message):
        call()


def test_raw_backward_op_names_a_misshapen_gradient():
    with pytest.raises(ValueError, match="gpt_oss_glu_backward: grad_a_SF must be"):
        torch.ops.dsv3.gpt_oss_glu_backward(torch.randn(4, 3), torch.randn(4, 8), ALPHA)


# --- transformers' GPT-OSS -------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("limit", [7.0, 1.5])
def test_matches_transformers_apply_gate(limit, device):
    """The op is what GptOssExperts._apply_gate computes on the gate_up projection,
    values and gradients (fp32), with the config's alpha and limit: 7 (GPT-OSS's,
    which 5 N(0, 1) inputs reach) and a tighter 1.5."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    config = transformers.GptOssConfig(hidden_size=16, intermediate_size=24, num_local_experts=4,
                                       num_experts_per_tok=2, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                       vocab_size=32, swiglu_limit=limit)
    experts = GptOssExperts(config).to(device)
    # transformers 5.17 (the GPU machine's) hard-codes limit = 7.0 and ignores the
    # config's; _apply_gate reads the attribute in every version.
    experts.limit = limit
    assert experts.alpha == ALPHA
    h_S2F = 5 * torch.randn(33, 2 * config.intermediate_size, device=device)
    assert (h_S2F[:, 0::2] > limit).any() and (h_S2F[:, 1::2] < -limit).any()
    ours, theirs = h_S2F.clone().requires_grad_(), h_S2F.clone().requires_grad_()
    a_SF = ops.gpt_oss_glu(ours, experts.alpha, experts.limit)
    want_SF = experts._apply_gate(theirs)
    grad_a_SF = torch.randn_like(a_SF)
    a_SF.backward(grad_a_SF)
    want_SF.backward(grad_a_SF)
    assert_close(a_SF, want_SF)
    assert_close(ours.grad, theirs.grad, "grad of h_S2F")


@pytest.mark.parametrize("limit", [None, 7.0])
@pytest.mark.parametrize("device", DEVICES)
def test_extreme_gates_follow_torch(device, limit):
    """Gates where exp(-alpha * gate) overflows float: torch's sigmoid is 0 there, so the
    output is -0 for a finite gate and NaN for -inf. Before, the C++ sigmoid bottomed
    out at 6e-39: a gate of -1e37 gave -0.06 (x (up + 1))."""
    gate = torch.tensor([-3e38, -1e37, -1e30, -200.0, -60.0, -math.inf, 50.0, 3.0],
                        device=device)
    h_S2F = torch.stack([gate, torch.full_like(gate, 2.0)], dim=1).reshape(1, -1)
    got_h, want_h = h_S2F.clone().requires_grad_(), h_S2F.clone().requires_grad_()
    got = ops.gpt_oss_glu(got_h, 1.702, limit)
    want = reference.gpt_oss_glu(want_h, 1.702, limit)
    torch.testing.assert_close(got, want, equal_nan=True)
    (got_grad,) = torch.autograd.grad(got, got_h, torch.full_like(got, 10.0))
    (want_grad,) = torch.autograd.grad(want, want_h, torch.full_like(want, 10.0))
    torch.testing.assert_close(got_grad, want_grad, equal_nan=True)
