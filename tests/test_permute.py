"""dsv3.ops.expert_index / permute / unpermute against the reference: the index
(offsets, row map) exactly, rows and gradients within tolerance; stability of
the permutation, placement of dropped copies, determinism of the combine."""
import pytest
import torch

from conftest import (DEVICES, DTYPES, LOW_PRECISION, TRITON_INTERPRETED, assert_close,
                      assert_close_to_reference, check_op, make_experts)
from dsv3 import ops, reference

# (T, E, K, D, expert pattern)
CASES = [
    # Baseline: random top-2 of 8.
    pytest.param(64, 8, 2, 32, "random", id="baseline"),
    # T = 1: a single token.
    pytest.param(1, 8, 2, 32, "random", id="T1"),
    # K = E: every token goes to every expert.
    pytest.param(12, 5, 5, 32, "random", id="K_eq_E"),
    # Odd model dim D = 100.
    pytest.param(20, 8, 2, 100, "random", id="D100"),
    # Prime E = 7, T·K = 39: not a multiple of the 16-token grain or any power of two.
    pytest.param(13, 7, 3, 24, "random", id="primeE7_TK39"),
    # Prime E = 13 with T = 17 (just past one 16-token grain).
    pytest.param(17, 13, 2, 8, "random", id="primeE13"),
    # All tokens to one expert (K = 1): every other segment is empty.
    pytest.param(33, 8, 1, 16, "one_expert", id="one_expert_K1"),
    # All tokens to the same two experts.
    pytest.param(33, 8, 2, 16, "one_expert", id="one_expert_K2"),
    # Empty experts, including the first and the last (E = 7: only 1, 3, 5 used).
    pytest.param(40, 7, 2, 16, "empty", id="empty_experts"),
    # Dropped copies (expert id -1) must land after every expert's rows.
    pytest.param(40, 8, 2, 16, "dropped", id="dropped"),
    # Top-10: past the 8 copies whose dots the CUDA backward reduces at once; rows of
    # 2112 values span several of its column blocks (and the Triton kernels').
    pytest.param(5, 16, 10, 2112, "random", id="K10_D2112"),
    # D = 604: bf16 rows of 1208 bytes, not 16-byte multiples (the CUDA kernels' scalar
    # path), over several column blocks.
    pytest.param(6, 8, 3, 604, "random", id="D604"),
    # Top-10 over rows of 2110 values: 4220 bytes in 16-bit dtypes, 8440 in fp32, no
    # 16-byte multiples (the CUDA backward's scalar path) with more than 8 copies.
    pytest.param(4, 16, 10, 2110, "random", id="K10_D2110"),
    # Medium: 9003 copies span more than one 4096-copy chunk of the C++ counting sort.
    # The interpreter pass runs that index on the C++ kernel too (the first pass checks
    # it at full size) and runs one Triton program per copy, about 5 ms each there:
    # 903 copies keep many programs over every expert at a tenth of the time.
    pytest.param(301, 16, 3, 16, "random", id="medium") if TRITON_INTERPRETED else
    pytest.param(3001, 16, 3, 16, "random", id="medium_multichunk"),
]


def _segments(offsets_E):
    ends = offsets_E.long().tolist()
    return list(zip([0] + ends[:-1], ends))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T, E, K, pattern",
                         [pytest.param(*c.values[:3], c.values[4], id=c.id) for c in CASES] + [
    # DeepSeek-V3-like routing: 32768 copies over 256 experts, 128 blocks of the CUDA
    # counting sort, so the device-wide scan crosses many (block, expert) counts.
    pytest.param(4096, 256, 8, "random", id="E256_K8_many_blocks"),
    pytest.param(4096, 256, 8, "dropped", id="E256_K8_dropped")])
def test_expert_index_matches_reference(T, E, K, pattern, device):
    experts_TK = make_experts(T, E, K, pattern, device)
    offsets_E, row_map_TK = ops.expert_index(experts_TK, E)
    want_offsets_E, want_row_map_TK = reference.expert_index(experts_TK, E)
    assert_close(offsets_E, want_offsets_E, "offsets_E")
    assert_close(row_map_TK, want_row_map_TK, "row_map_TK")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, E, K, D, pattern", CASES)
def test_permute_matches_reference(T, E, K, D, pattern, dtype, device):
    x_TD = torch.randn(T, D, device=device).to(dtype)
    experts_TK = make_experts(T, E, K, pattern, device)
    (x_SD, offsets_E, row_map_TK), _ = check_op(
        lambda x: ops.permute(x, experts_TK, E), lambda x: reference.permute(x, experts_TK, E),
        [x_TD], differentiable=(0,))
    # A permutation copies rows: exact in every dtype.
    assert torch.equal(x_SD, x_TD.repeat_interleave(K, 0)[row_map_TK.flatten().argsort()])
    assert offsets_E.dtype == row_map_TK.dtype == torch.int32
    assert sorted(row_map_TK.flatten().tolist()) == list(range(T * K))  # a bijection
    dropped_TK = experts_TK < 0
    assert offsets_E[-1].item() == T * K - dropped_TK.sum().item()
    # Dropped copies come after every expert's segment.
    assert (row_map_TK[dropped_TK] >= offsets_E[-1]).all()
    # Each copy sits in its expert's segment.
    for e, (start, end) in enumerate(_segments(offsets_E)):
        rows = row_map_TK[experts_TK == e]
        assert rows.numel() == end - start and ((rows >= start) & (rows < end)).all()


@pytest.mark.parametrize("T, E, K, pattern", [
    (64, 8, 2, "random"),  # baseline
    # several chunks of the C++ counting sort (under the interpreter a tenth: see CASES)
    (301 if TRITON_INTERPRETED else 3001, 16, 3, "random"),
    (40, 8, 2, "dropped"),  # dropped copies keep their token order too
])
def test_permute_is_stable(T, E, K, pattern):
    """Within an expert (and among dropped copies) copies keep token order."""
    experts_TK = make_experts(T, E, K, pattern)
    _, offsets_E, row_map_TK = ops.permute(torch.randn(T, 4), experts_TK, E)
    flat_rows = row_map_TK.flatten().long()
    source_S = torch.empty_like(flat_rows)
    source_S[flat_rows] = torch.arange(T * K)  # row -> flat (t, k) index, in (t, k) order
    for start, end in _segments(offsets_E) + [(offsets_E[-1].item(), T * K)]:
        assert (source_S[start:end].diff() > 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_weights", [True, False])
@pytest.mark.parametrize("T, E, K, D, pattern", CASES)
def test_unpermute_matches_reference(T, E, K, D, pattern, with_weights, dtype, device):
    experts_TK = make_experts(T, E, K, pattern, device)
    _, row_map_TK = ops.expert_index(experts_TK, E)
    y_SD = torch.randn(T * K, D, device=device).to(dtype)
    # Routing weights stay fp32 whatever the activations' dtype, as in the MoE layer.
    weights_TK = torch.rand(T, K, device=device) if with_weights else None
    check_op(lambda y, w: ops.unpermute(y, row_map_TK, w),
             lambda y, w: reference.unpermute(y, row_map_TK, w),
             [y_SD, weights_TK], differentiable=(0, 1) if with_weights else (0,))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, E, K, D, pattern", CASES)
def test_triton_permutation_kernels_on_the_gpu(T, E, K, D, pattern, dtype):
    """A GPU build runs csrc/cuda's permutation kernels for the ops; the Triton ones
    (dsv3/kernels/permute.py) serve builds without nvcc. Each against the reference on
    the GPU: the scatter exactly, the weighted combine and its backward (the copies'
    gradients and the routing weights') within the dtype's tolerance."""
    from dsv3.kernels import permute as triton_permute
    experts_TK = make_experts(T, E, K, pattern, "cuda")
    _, row_map_TK = ops.expert_index(experts_TK, E)
    rows_S = row_map_TK.flatten().long()
    x_TD = torch.randn(T, D, device="cuda").to(dtype)
    x_SD = torch.empty(T * K, D, device="cuda", dtype=dtype)
    x_SD[rows_S] = x_TD.repeat_interleave(K, 0)
    assert torch.equal(triton_permute.permute_rows(x_TD, row_map_TK), x_SD)

    y_SD = torch.randn(T * K, D, device="cuda").to(dtype)
    weights_TK = torch.rand(T, K, device="cuda")
    grad_TD = torch.randn(T, D, device="cuda").to(dtype)
    got = (triton_permute.unpermute(y_SD, row_map_TK, weights_TK),
           *triton_permute.unpermute_backward(grad_TD, y_SD, row_map_TK, weights_TK))

    def reference_run(y, w, grad):
        y, w = y.clone().requires_grad_(), w.clone().requires_grad_()
        out = reference.unpermute(y, row_map_TK, w)
        return (out.detach(), *torch.autograd.grad(out, (y, w), grad.to(out.dtype)))

    names = ("y_TD", "grad_y_SD", "grad_weights_TK")
    if dtype in LOW_PRECISION:
        exact = reference_run(y_SD.double(), weights_TK.double(), grad_TD.double())
        plain = reference_run(y_SD, weights_TK, grad_TD)
        for name, out, want, low in zip(names, got, exact, plain, strict=True):
            assert_close_to_reference(out.cpu(), want.cpu(), low.cpu(), name, dtype)
    else:
        for name, out, want in zip(names, got, reference_run(y_SD, weights_TK, grad_TD),
                                   strict=True):
            assert_close(out, want, name)


def test_unpermute_is_deterministic():
    """Bitwise identical on repeat and whatever the thread count (no atomics)."""
    # 257 tokens: past the C++ kernel's parallel grain; the interpreter (one thread, one
    # program a token) gets 65: 7 s there against 44 s for 257
    T, E, K, D = (65 if TRITON_INTERPRETED else 257), 8, 4, 64
    experts_TK = make_experts(T, E, K)
    _, row_map_TK = ops.expert_index(experts_TK, E)
    y_SD = torch.randn(T * K, D, dtype=torch.bfloat16, requires_grad=True)
    weights_TK = torch.rand(T, K, requires_grad=True)
    grad_TD = torch.randn(T, D, dtype=torch.bfloat16)

    def run():
        y_TD = ops.unpermute(y_SD, row_map_TK, weights_TK)
        return (y_TD, *torch.autograd.grad(y_TD, (y_SD, weights_TK), grad_TD))

    first = run()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, run(), single):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
def test_a_nan_weight_gives_nan_bf16_rows(device):
    """NaN 0x7fffffff (CUDA's canonical NaN, e.g. weights routed on a GPU) came out of
    the CPU kernels' bf16 rounding as -0.0: its rounding increment carried into the
    sign bit. Now it stays NaN, forward and backward, as the reference gives."""
    nan = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
    y_SD = torch.ones(2, 4, dtype=torch.bfloat16, device=device, requires_grad=True)
    row_map_TK = torch.tensor([[0, 1]], dtype=torch.int32, device=device)
    weights_TK = torch.tensor([[1.0, 0.0]], device=device)
    weights_TK[0, 1] = nan.to(device)[0]  # the bit pattern itself, not Python's NaN
    y_TD = ops.unpermute(y_SD, row_map_TK, weights_TK)
    assert y_TD.isnan().all()
    [grad_SD] = torch.autograd.grad(y_TD, y_SD, torch.ones_like(y_TD))
    assert grad_SD[1].isnan().all() and torch.equal(grad_SD[0].cpu(), torch.ones(4, dtype=torch.bfloat16))


def test_permute_unpermute_round_trip():
    """Unweighted unpermute of a permute sums the K copies: K * x."""
    x_TD = torch.randn(50, 16)
    x_SD, _, row_map_TK = ops.permute(x_TD, make_experts(50, 8, 3), 8)
    assert_close(ops.unpermute(x_SD, row_map_TK), 3 * x_TD)


@pytest.mark.gpu
def test_the_cuda_kernels_refuse_what_they_would_read_wrong():
    """Direct torch.ops calls reach csrc/cuda without the Python wrappers' checks. A row
    map left on the CPU was read through its host pointer on the device (an illegal
    address that ends the CUDA context), a y_SD of other than T * K rows left rows of
    its gradient unwritten, and an expert count past the histogram's shared memory
    failed as a bare CUDA error."""
    from dsv3 import _C  # noqa: F401  (the dsv3:: ops)
    experts_TK = torch.randint(0, 4, (8, 2), device="cuda", dtype=torch.int32)
    _, row_map_TK = torch.ops.dsv3.expert_index(experts_TK, 4)
    y_SD, weights_TK = torch.randn(16, 8, device="cuda"), torch.rand(8, 2, device="cuda")
    with pytest.raises(ValueError, match="unpermute: row_map_TK must be on y_SD's device"):
        torch.ops.dsv3.unpermute(y_SD, row_map_TK.cpu(), weights_TK)
    with pytest.raises(ValueError, match="unpermute: weights_TK must be on y_SD's device"):
        torch.ops.dsv3.unpermute(y_SD, row_map_TK, weights_TK.cpu())
    with pytest.raises(ValueError, match=r"unpermute_backward: y_SD must have T \* K = 16 rows"):
        torch.ops.dsv3.unpermute_backward(torch.randn(8, 8, device="cuda"),
                                          torch.randn(21, 8, device="cuda"), row_map_TK,
                                          weights_TK)
    with pytest.raises(ValueError, match="permute_rows: row_map_TK must be on x_TD's device"):
        torch.ops.dsv3.permute_rows(torch.randn(8, 8, device="cuda"), row_map_TK.cpu())
    with pytest.raises(ValueError, match="expert_index: n_experts must be < 12288 on CUDA"):
        torch.ops.dsv3.expert_index(experts_TK, 12288)
