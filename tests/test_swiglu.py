"""dsv3.ops.swiglu against reference.swiglu: output and d(h) (gate and up halves)."""
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


def test_swiglu_non_contiguous_input():
    h_S2F = torch.randn(10, 24)[::2]
    torch.testing.assert_close(ops.swiglu(h_S2F), reference.swiglu(h_S2F))
