"""tests/interpreter_patching.py, which conftest installs under TRITON_INTERPRET=1: a
launch patches triton.language once, its helpers' calls do not patch it again, a
kernel computes what it computed before, and a launch that raises leaves the next
launch patched as usual."""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from dsv3.kernels import config  # noqa: E402

pytestmark = pytest.mark.skipif(not config.INTERPRET,
                                reason="patches Triton's interpreter: under TRITON_INTERPRET=1")


@triton.jit
def _row_sum(x_ptr, row, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    return tl.sum(tl.load(x_ptr + row * BLOCK + offsets) + tl.zeros([BLOCK], tl.float32))


@triton.jit
def _sum_rows_kernel(x_ptr, out_ptr, n_rows, BLOCK: tl.constexpr):
    total = 0.0
    for row in range(n_rows):  # a helper's call, and tl.sum's and tl.zeros', per row
        total += _row_sum(x_ptr, row, BLOCK)
    tl.store(out_ptr + tl.program_id(0), total)


@triton.jit
def _failing_kernel(x_ptr, BLOCK: tl.constexpr):
    _row_sum(x_ptr, 0, BLOCK)
    tl.static_assert(BLOCK < 0, "stops the launch")


@pytest.fixture
def real_patches(monkeypatch):
    """The calls in which the interpreter really patched triton.language: the
    installed wrapper returns no patch scope where it left the launch's in place."""
    from triton.runtime import interpreter
    calls = []
    patch_lang = interpreter._patch_lang

    def counting(fn):
        scope = patch_lang(fn)
        if scope is not None:
            calls.append(fn.__name__)
        return scope

    monkeypatch.setattr(interpreter, "_patch_lang", counting)
    return calls


def _sum_rows(n_rows: int) -> torch.Tensor:
    x = torch.randn(n_rows, 16)
    out = torch.zeros(2)
    _sum_rows_kernel[(2,)](x, out, n_rows, 16)
    torch.testing.assert_close(out, x.sum().expand(2), rtol=1e-5, atol=1e-5)
    return out


def test_installed():
    from triton.runtime import interpreter
    assert getattr(interpreter._patch_lang, "_dsv3_once_per_launch", False)


def test_a_launch_patches_once_however_many_helper_calls(real_patches):
    _sum_rows(1)
    one_row = list(real_patches)
    real_patches.clear()
    _sum_rows(12)  # 2 programs x 12 rows x 3 helper calls, unpatched
    # The kernel (triton.language), then tl.zeros (triton.language.core): Triton alone
    # patches again on each of the 72 calls.
    assert real_patches == one_row == ["_sum_rows_kernel", "zeros"]


def test_a_launch_that_raises_leaves_the_next_patched(real_patches):
    with pytest.raises(Exception, match="stops the launch"):
        _failing_kernel[(1,)](torch.randn(16), 16)
    real_patches.clear()
    _sum_rows(3)
    assert real_patches == ["_sum_rows_kernel", "zeros"]  # not taken for the failed one's helper
