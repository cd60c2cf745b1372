"""dsv3.ops.swiglu against reference.swiglu: output and d(h) (gate and up halves),
unclamped and clamped (``limit``: GLM-5-Next's and DeepSeek-V4's swiglu_limit)."""
import math

import pytest
import torch

from conftest import DEVICES, DTYPES, check_op
from dsv3 import ops, reference

# (S, F): rows and expert hidden size (h is [S, 2F]).
CASES = [
    # Baseline.
    pytest.param(64, 128, id="baseline"),
    # One row (T = 1, K = 1).
    pytest.param(1, 64, id="one_row"),
    # F = 1: the narrowest hidden size.
    pytest.param(7, 1, id="F1"),
    # Odd F = 37 and S = 39: not a multiple of the vector width or the 16-row grain.
    pytest.param(39, 37, id="odd_F37_S39"),
    # F = 100 (odd dims as in D = 100).
    pytest.param(17, 100, id="F100"),
    # Medium: many rows over several parallel chunks, vector tail of 3.
    pytest.param(1000, 259, id="medium"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S, F", CASES)
def test_swiglu_matches_reference(S, F, dtype, device):
    h_S2F = (3 * torch.randn(S, 2 * F, device=device)).to(dtype)
    (a_SF,), _ = check_op(ops.swiglu, reference.swiglu, [h_S2F], differentiable=(0,))
    assert a_SF.shape == (S, F) and a_SF.dtype == dtype


def test_swiglu_large_magnitude_gates_stay_finite():
    """exp(-gate) overflows for very negative gates; silu must still go to 0, not NaN."""
    h_S2F = torch.tensor([[-1000.0, -100.0, 0.0, 100.0, 1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    a_SF = ops.swiglu(h_S2F)
    (grad_h,) = torch.autograd.grad(a_SF.sum(), h_S2F)
    want = reference.swiglu(h_S2F.detach())
    torch.testing.assert_close(a_SF, want)
    assert torch.isfinite(grad_h).all()


# Gates where exp(-gate) overflows float: torch's sigmoid is 0 there, so silu(gate) is
# -0 for a finite gate and NaN for -inf (-inf * 0); up to -1e38, not near 0.
EXTREME_GATES = [-3e38, -1e37, -1e30, -200.0, -90.0, -math.inf, math.inf, 50.0]


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_gates_follow_torch(device):
    """Before: the C++ sigmoid bottomed out at 6e-39, so a gate of -1e37 gave -0.06 and
    one of -inf gave -inf where torch gives -0 and NaN."""
    gate = torch.tensor(EXTREME_GATES, device=device)
    h_S2F = torch.cat([gate, torch.full_like(gate, 2.0)]).reshape(1, -1)
    got_h, want_h = h_S2F.clone().requires_grad_(), h_S2F.clone().requires_grad_()
    got, want = ops.swiglu(got_h), reference.swiglu(want_h)
    torch.testing.assert_close(got, want, equal_nan=True)
    grad_a_SF = torch.full_like(got, 10.0)  # dy * gate would overflow before the sigmoid
    (got_grad,) = torch.autograd.grad(got, got_h, grad_a_SF)
    (want_grad,) = torch.autograd.grad(want, want_h, grad_a_SF)
    torch.testing.assert_close(got_grad, want_grad, equal_nan=True)


def test_swiglu_non_contiguous_input():
    h_S2F = torch.randn(10, 24)[::2]
    torch.testing.assert_close(ops.swiglu(h_S2F), reference.swiglu(h_S2F))


# --- clamped SwiGLU (GLM-5-Next, DeepSeek-V4): gate.clamp(max=L), up.clamp(-L, L) ---------
# (S, F, L): with h ~ 3 N(0, 1), every limit here clamps a good share of gate and up.
CLAMPED_CASES = [
    # Baseline, L = 2.
    pytest.param(64, 128, 2.0, id="baseline_L2"),
    # One row; a limit of 10 (GLM-5-Next's default) clamps the 3-sigma tail only.
    pytest.param(1, 64, 10.0, id="one_row_L10"),
    # Odd F = 37 and S = 39: the vector tails of the clamped chunks.
    pytest.param(39, 37, 1.0, id="odd_F37_S39_L1"),
    # Medium: several parallel chunks, F past one 512-float chunk.
    pytest.param(200, 600, 0.5, id="medium_L05"),
]


def straddling(S, F, limit, dtype, device="cpu"):
    """h [S, 2F] ~ 3 N(0, 1) with, in row 0, gate and up exactly at -L, +L, and at the
    neighbouring values of the dtype on each side, so that the clamp's bounds are hit
    and both ways past them."""
    h_S2F = (3 * torch.randn(S, 2 * F)).to(dtype)
    at = torch.tensor([limit, -limit], dtype=dtype)
    edges = torch.cat([at, torch.nextafter(at, at * 2), torch.nextafter(at, at * 0)])
    n = min(F, edges.numel())
    h_S2F[0, :n] = edges[:n]  # gate
    h_S2F[0, F:F + n] = edges.flip(0)[:n]  # up
    return h_S2F.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S, F, limit", CLAMPED_CASES)
def test_clamped_swiglu_matches_reference(S, F, limit, dtype, device):
    h_S2F = straddling(S, F, limit, dtype, device)
    gate, up = h_S2F.float().chunk(2, dim=1)
    assert (gate > limit).any() and (up.abs() > limit).any(), "the limit clamps nothing"
    (a_SF,), (grad_h,) = check_op(lambda h: ops.swiglu(h, limit),
                                  lambda h: reference.swiglu(h, limit), [h_S2F],
                                  differentiable=(0,))
    assert a_SF.shape == (S, F) and a_SF.dtype == dtype
    # Where the clamp cuts the gradient, it is exactly zero (the comparison's tolerance
    # would let a small leak through): the same zeros as torch's clamp.
    clamped = torch.cat([gate > limit, up.abs() > limit], dim=1)
    assert (grad_h[clamped] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_clamped_swiglu_at_the_bounds_follows_torch(dtype):
    """gate and up exactly at +-L, and one dtype step inside and outside: which gradients
    are zero is exactly what torch's clamp gives (on the bounds themselves: 1 in torch
    2.12 and before, 0 in 2.14: whichever this torch does), with L = 3 and with L = 1.3,
    which no dtype holds exactly (torch rounds it to the dtype)."""
    for limit in (3.0, 1.3):
        at = torch.tensor([limit, -limit], dtype=dtype)
        values = torch.cat([at, torch.nextafter(at, at * 2), torch.nextafter(at, at * 0),
                            torch.tensor([0.5, -0.5], dtype=dtype)])
        # Every pairing of gate and up values.
        gate = values.repeat_interleave(values.numel())
        up = values.repeat(values.numel())
        h_S2F = torch.cat([gate, up])[None].contiguous()
        got = h_S2F.clone().requires_grad_()
        want = h_S2F.clone().requires_grad_()
        a_SF, want_SF = ops.swiglu(got, limit), reference.swiglu(want, limit)
        torch.testing.assert_close(a_SF, want_SF, rtol=2e-2, atol=1e-2)
        (grad_got,) = torch.autograd.grad(a_SF.sum(), got)
        (grad_want,) = torch.autograd.grad(want_SF.sum(), want)
        assert torch.equal(grad_got == 0, grad_want == 0), f"limit {limit}: zeros differ"
        torch.testing.assert_close(grad_got, grad_want, rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_at_limit", [False, True])
def test_clamped_swiglu_backward_on_the_bounds(grad_at_limit, dtype, device):
    """Both conventions of the backward kernel (the op passes the one of the running
    torch): with grad_at_limit an input exactly at +-L passes its gradient (torch 2.12
    and before), without it it gets 0 (2.14). Against the formula written out."""
    limit = 2.0
    h_S2F = straddling(16, 8, limit, dtype, device)
    grad_a_SF = torch.randn(16, 8, device=device).to(dtype)
    got = torch.ops.dsv3.swiglu_backward(grad_a_SF, h_S2F, limit, grad_at_limit)
    gate, up = h_S2F.double().chunk(2, dim=1)
    dy = grad_a_SF.double()
    g, u = gate.clamp(max=limit), up.clamp(-limit, limit)
    sig = torch.sigmoid(g)
    passes_gate = (gate <= limit) if grad_at_limit else (gate < limit)
    passes_up = (up.abs() <= limit) if grad_at_limit else (up.abs() < limit)
    want = torch.cat([torch.where(passes_gate, dy * u * sig * (1 + g * (1 - sig)), 0.0),
                      torch.where(passes_up, dy * g * sig, 0.0)], dim=1)
    assert torch.equal(got == 0, want == 0)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 5)


def test_clamped_swiglu_gradcheck_and_opcheck():
    h_S2F = 3 * torch.randn(9, 10, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda h: ops.swiglu(h, 2.0), (h_S2F.requires_grad_(),))
    torch.library.opcheck(torch.ops.dsv3.swiglu.default,
                          (3 * torch.randn(18, 8, requires_grad=True), 2.0))


def test_clamped_swiglu_refuses_double_backward():
    h_S2F = (3 * torch.randn(6, 8)).requires_grad_()
    (grad_h,) = torch.autograd.grad(ops.swiglu(h_S2F, 2.0).square().sum(), h_S2F,
                                    create_graph=True)
    with pytest.raises(NotImplementedError, match="swiglu: double backward"):
        grad_h.sum().backward()


def test_an_int_limit_is_a_float_one():
    h_S2F = 3 * torch.randn(5, 8)
    torch.testing.assert_close(ops.swiglu(h_S2F, 2), ops.swiglu(h_S2F, 2.0))


@pytest.mark.parametrize("limit, error, message", [
    (0.0, ValueError, "swiglu: limit must be > 0"),
    (-2.0, ValueError, "swiglu: limit must be > 0"),
    (math.inf, ValueError, "swiglu: limit must be finite"),
    (math.nan, ValueError, "swiglu: limit must be finite"),
    ("2", TypeError, "swiglu: limit must be a number, got str"),
    (True, TypeError, "swiglu: limit must be a number, got bool"),
    (torch.tensor(2.0), TypeError, "swiglu: limit must be a number, got Tensor"),
])
def test_bad_limit(limit, error, message):
    with pytest.raises(error, match=message):
        ops.swiglu(torch.randn(4, 8), limit)


def test_a_limit_past_the_dtype_range_is_refused():
    # Before: fp16 rounded 1e5 to inf, so nothing was clamped, where torch's clamp (the
    # reference, transformers' _apply_gate) raises.
    with pytest.raises(ValueError, match="swiglu: limit 100000.0 is past the range"):
        ops.swiglu(torch.randn(4, 8, dtype=torch.float16), 1e5)


def test_unclamped_float64_backward_keeps_infinite_inputs_gradients():
    # Before: without a limit the fp64 kernel compared with an infinite limit, so an
    # infinite gate or up lost its gradient (0 where torch gives a number or NaN).
    inf = math.inf
    h_S2F = torch.tensor([[1.0, 2.0, inf, -inf, inf, -inf, 3.0, 3.0]], dtype=torch.float64)
    grad_a_SF = torch.ones(1, 4, dtype=torch.float64)
    h_ref = h_S2F.clone().requires_grad_()
    (want,) = torch.autograd.grad(reference.swiglu(h_ref), h_ref, grad_a_SF)
    got = torch.ops.dsv3.swiglu_backward(grad_a_SF, h_S2F)
    torch.testing.assert_close(got, want, equal_nan=True)


def test_import_under_a_meta_default_device():
    # Before: the import-time probe of torch's clamp gradient made its tensor on the
    # default device and read it back: meta-device model loading failed at `import dsv3`.
    import subprocess
    import sys
    code = "import torch; torch.set_default_device('meta'); import dsv3; print(dsv3.ops.swiglu)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_limit_rounding_stays_on_the_cpu():
    """The Triton launchers round the limit to the tensor's dtype with a CPU tensor,
    whatever the default device: on a GPU its .item() would sync (and break CUDA-graph
    capture); on the meta device it cannot run at all."""
    pytest.importorskip("triton")
    from dsv3.kernels import swiglu as swiglu_kernels
    swiglu_kernels._limit_in.cache_clear()
    with torch.device("meta"):
        rounded = swiglu_kernels._limit_in(7.3, torch.bfloat16)
    assert rounded == torch.tensor(7.3, dtype=torch.bfloat16).item() != 7.3
