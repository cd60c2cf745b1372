"""dsv3.ops.quantize_int8 / dequantize_int8 (the compute of the compressed
all-reduce) against the reference: every level, scale and residual exactly, over
block layouts and the degenerate blocks; the error bound of one round trip."""
import math

import pytest
import torch

from conftest import DEVICES
from dsv3 import ops, reference

# (N, block_size, pattern)
CASES = [
    # Whole blocks of the default size.
    pytest.param(1024, 256, "random", id="whole_blocks"),
    # N not a multiple of the block: a partial last block.
    pytest.param(1000, 256, "random", id="partial_tail"),
    # Fewer values than one block.
    pytest.param(7, 128, "random", id="N_lt_block"),
    # Block of one value: every value is its own scale (levels are all +-127 or 0).
    pytest.param(33, 1, "random", id="block_1"),
    # Odd block size, not a power of two.
    pytest.param(500, 100, "random", id="block_100"),
    # An all-zero block: scale 0, levels 0, residual 0 (no division by zero).
    pytest.param(512, 256, "zero_block", id="zero_block"),
    # Values exactly on rounding halves (k + 0.5 levels): half away from zero everywhere.
    pytest.param(256, 256, "halves", id="halves"),
    # Huge dynamic range within a block: small values quantize to 0 and go to the residual.
    pytest.param(256, 64, "range", id="dynamic_range"),
    # Values near the smallest floats: max|v| / 127 is a denormal and rounded, so v / scale
    # can pass 127.5; levels stay within +-127 (int8 would wrap to the other sign).
    pytest.param(512, 256, "denormal_scale", id="denormal_scale"),
    # Many blocks: several GPU programs (each takes several blocks), the last one partial.
    pytest.param(20000, 128, "random", id="many_programs"),
]


def make_values(n, block_size, pattern, device):
    x_N = torch.randn(n) * 3
    if pattern == "zero_block":
        x_N[:block_size] = 0
    elif pattern == "halves":
        # max |x| = 127 makes the scale exactly 1, so every other value is a level + 0.5.
        x_N = (torch.arange(n) % 252 - 126).float() + 0.5
        x_N[0] = 127.0
    elif pattern == "range":
        x_N = x_N * torch.logspace(-6, 2, n)
    elif pattern == "denormal_scale":
        x_N = x_N * 1e-41
        x_N[:block_size] = 0
        x_N[0] = 2e-42  # alone in its block: 2e-42 / (2e-42 / 127) rounds past 127.5
    return x_N.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_error", [False, True])
@pytest.mark.parametrize("n, block_size, pattern", CASES)
def test_quantize_matches_reference(n, block_size, pattern, with_error, device):
    x_N = make_values(n, block_size, pattern, device)
    error_N = 0.01 * torch.randn(n, device=device) if with_error else None
    got = ops.quantize_int8(x_N, block_size, error_N)
    want = reference.quantize_int8(x_N.cpu(), block_size, None if error_N is None else error_N.cpu())
    assert got.q_N.dtype == torch.int8 and got.scales_B.dtype == got.error_N.dtype == torch.float32
    assert got.scales_B.shape == (math.ceil(n / block_size),)
    for name, g, w in zip(("q_N", "scales_B", "error_N"), got, want):
        assert torch.equal(g.cpu(), w), f"{name} differs from the reference"
    # Levels keep to +-127 and to their values' signs.
    q_N, v_cpu_N = got.q_N.cpu().int(), (x_N + (error_N if error_N is not None else 0)).cpu()
    assert q_N.abs().max() <= 127
    assert (q_N * v_cpu_N.sign() >= 0).all(), "a level has the other sign than its value"
    # One round trip loses at most half a level per value, and the residual is exactly that loss.
    v_N = x_N + (error_N if error_N is not None else 0)
    back_N = ops.dequantize_int8(got.q_N, got.scales_B, block_size)
    half_level_N = (got.scales_B / 2).repeat_interleave(block_size)[:n]
    assert ((v_N - back_N).abs() <= half_level_N * (1 + 1e-6) + 1e-30).all()
    torch.testing.assert_close(back_N + got.error_N, v_N, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_rows", [1, 2, 5])
@pytest.mark.parametrize("n", [1000, 20000])  # one GPU program; several, the last partial
def test_dequantize_sums_rows_in_order(n_rows, n, device):
    """Several ranks' chunks dequantized and summed in rank order, as the reference."""
    block_size = 128
    parts = [ops.quantize_int8(torch.randn(n, device=device), block_size) for _ in range(n_rows)]
    q_RN = torch.stack([p.q_N for p in parts])
    scales_RB = torch.stack([p.scales_B for p in parts])
    got = ops.dequantize_int8(q_RN, scales_RB, block_size)
    assert torch.equal(got.cpu(), reference.dequantize_int8(q_RN.cpu(), scales_RB.cpu(), block_size))


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_reads_strided_and_expanded_inputs(device):
    """The C++ kernel read a 1-D q_N or scales_B as dense: a strided one gave wrong
    sums, an expanded one (stride 0) read past its storage."""
    parts = ops.quantize_int8(torch.randn(2 * 512, device=device), 256)
    q_N, scales_B = parts.q_N.view(512, 2)[:, 0], parts.scales_B.view(2, 2)[:, 0]
    assert torch.equal(ops.dequantize_int8(q_N, scales_B, 256).cpu(),
                       reference.dequantize_int8(q_N.cpu(), scales_B.cpu(), 256))
    q_N = torch.tensor([7], dtype=torch.int8, device=device).expand(4096)
    scales_B = torch.tensor([0.5], device=device).expand(16)
    assert torch.equal(ops.dequantize_int8(q_N, scales_B, 256).cpu(), torch.full((4096,), 3.5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_block_propagates_and_leaves_clean_residual(bad, device):
    """An fp16 overflow must reach AMP's scaler (NaN out) but not the error feedback."""
    x_N = torch.randn(600, device=device)
    x_N[300] = bad  # block 1 of 256
    q_N, scales_B, error_N = ops.quantize_int8(x_N, 256)
    assert torch.isnan(scales_B[1]) and torch.isfinite(scales_B[[0, 2]]).all()
    assert (error_N[256:512] == 0).all() and torch.isfinite(error_N).all()
    back_N = ops.dequantize_int8(q_N, scales_B, 256)
    assert torch.isnan(back_N[256:512]).all() and torch.isfinite(back_N[:256]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_is_quantized_from_its_values(dtype, device):
    x_N = torch.randn(300).to(dtype)
    got = ops.quantize_int8(x_N.to(device), 128)
    want = reference.quantize_int8(x_N.float(), 128)
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("call, error, match", [
    (lambda: ops.quantize_int8(torch.randn(4, 4)), ValueError, "x_N must be 1-D"),
    (lambda: ops.quantize_int8(torch.arange(8)), TypeError, "x_N must have dtype"),
    (lambda: ops.quantize_int8(torch.randn(8), 0), ValueError, "block_size"),
    (lambda: ops.quantize_int8(torch.randn(8), 2.0), TypeError, "block_size"),
    (lambda: ops.quantize_int8(torch.randn(0)), ValueError, "x_N must not be empty"),
    (lambda: ops.quantize_int8(torch.randn(8), 4, torch.zeros(9)), ValueError, "error_N"),
    (lambda: ops.quantize_int8(torch.randn(8), 4, torch.zeros(8, dtype=torch.float64)), TypeError,
     "error_N"),
    (lambda: ops.dequantize_int8(torch.zeros(8), torch.ones(2), 4), TypeError, "q_RN"),
    (lambda: ops.dequantize_int8(torch.zeros(8, dtype=torch.int8), torch.ones(3), 4), ValueError,
     "scales_RB must have shape"),
    (lambda: ops.dequantize_int8(torch.zeros(2, 8, dtype=torch.int8), torch.ones(2), 4),
     ValueError, "must both be 1-D or both 2-D"),
    # no gradient: torch's fallback only warned "silently incorrect" on backward
    (lambda: ops.quantize_int8(torch.randn(8, requires_grad=True), 4), TypeError,
     r"quantize_int8: x_N requires grad, but the quantization has no gradient .* pass "
     r"x_N.detach\(\)"),
    (lambda: ops.quantize_int8(torch.randn(8), 4, torch.zeros(8, requires_grad=True)),
     TypeError, "quantize_int8: error_N requires grad"),
    (lambda: ops.dequantize_int8(torch.zeros(8, dtype=torch.int8),
                                 torch.ones(2, requires_grad=True), 4),
     TypeError, "dequantize_int8: scales_RB requires grad"),
    # past int64: the schema's own error said "expected int, found int"
    (lambda: ops.quantize_int8(torch.randn(8), 2**63), ValueError, r"block_size must be in "
     r"\[1, 2\*\*63 - 1\]"),
    (lambda: ops.dequantize_int8(torch.zeros(8, dtype=torch.int8), torch.ones(1), 2**63),
     ValueError, "dequantize_int8: block_size"),
], ids=["x_2d", "x_int", "block_0", "block_float", "x_empty", "error_shape", "error_dtype",
        "q_float", "scales_shape", "scales_dims", "x_grad", "error_grad", "scales_grad",
        "block_past_int64", "dequantize_block_past_int64"])
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_inputs_that_require_grad_are_fine_where_no_graph_is_built():
    """Quantizing a Parameter under no_grad builds no graph: it is not refused."""
    weight_N = torch.nn.Parameter(torch.randn(64))
    with torch.no_grad():
        q_N, scales_B, _ = ops.quantize_int8(weight_N, 16)
        assert ops.dequantize_int8(q_N, scales_B, 16).shape == (64,)


def test_a_block_size_past_the_tensor_is_one_block():
    """ceil(n / block_size) overflowed near 2^63: no blocks, scales never written."""
    x_N = torch.randn(10)
    for block_size in (10, 11, 2**62, 2**63 - 1):
        q = ops.quantize_int8(x_N, block_size)
        assert q.scales_B.shape == (1,)
        torch.testing.assert_close(ops.dequantize_int8(q.q_N, q.scales_B, block_size), x_N,
                                   rtol=0, atol=x_N.abs().max().item() / 127)
