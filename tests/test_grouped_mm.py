"""dsv3.ops.grouped_mm against reference.grouped_mm: output, d(x) and d(w) in both
weight layouts; rows past the last offset exactly zero; empty experts get an
exactly-zero weight gradient. dsv3.ops.gather_grouped_mm (the permute fused into
the loads) against the reference permute followed by the reference grouped_mm."""
import pytest
import torch

from conftest import (DEVICES, DTYPES, TRITON_INTERPRETED, assert_close,
                      assert_close_to_reference, check_op, make_experts)
from dsv3 import ops, reference

# (T, E, K, X, Y, expert pattern); S = T·K rows grouped by expert as permute makes them.
CASES = [
    # Baseline: 64 rows over 8 experts (the small-segment, expert-per-thread path).
    pytest.param(32, 8, 2, 32, 48, "random", id="baseline"),
    # T = 1: one token, K rows.
    pytest.param(1, 8, 2, 32, 48, "random", id="T1"),
    # K = E: every expert gets every token.
    pytest.param(10, 4, 4, 16, 24, "random", id="K_eq_E"),
    # Odd dims: X = 100, Y = 37.
    pytest.param(20, 8, 2, 100, 37, "random", id="odd_dims_X100_Y37"),
    # Prime E = 7 with T·K = 39 rows, not a multiple of any block.
    pytest.param(13, 7, 3, 24, 40, "random", id="primeE7_S39"),
    # Prime E = 13.
    pytest.param(26, 13, 2, 16, 16, "random", id="primeE13"),
    # All rows to one expert; the others are empty segments.
    pytest.param(40, 8, 1, 16, 32, "one_expert", id="one_expert"),
    # Empty experts, including the first and the last (E = 7: only 1, 3, 5 used).
    pytest.param(30, 7, 2, 16, 32, "empty", id="empty_experts"),
    # Dropped copies: rows past offsets_E[-1] must come out zero.
    pytest.param(30, 8, 2, 16, 32, "dropped", id="dropped_tail"),
    # Medium: 600 rows over 2 experts takes the large-segment (multithreaded BLAS) path.
    pytest.param(300, 2, 2, 64, 96, "random", id="medium_large_segments"),
    # Over 8 row tiles per expert and over 8 x tiles at the interpreter's 32-wide blocks:
    # the Triton kernels' grouped tile order (GROUP_M = 8) ends in a partial group.
    pytest.param(300, 2, 2, 272, 40, "random", id="partial_tile_groups"),
]
LAYOUTS = [
    "EXY",  # contiguous [E, X, Y]
    "EYX_T",  # nn.Linear's [out, in] = [E, Y, X], passed transposed (the MoE layer's layout)
]


def make_weights(E, X, Y, layout, dtype, device):
    if layout == "EXY":
        return torch.randn(E, X, Y, device=device).to(dtype) / X**0.5
    return (torch.randn(E, Y, X, device=device).to(dtype) / X**0.5).transpose(1, 2)


def make_rows(T, E, K, X, pattern, dtype, device):
    offsets_E, _ = ops.expert_index(make_experts(T, E, K, pattern), E)
    return torch.randn(T * K, X, device=device).to(dtype), offsets_E.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("T, E, K, X, Y, pattern", CASES)
def test_grouped_mm_matches_reference(T, E, K, X, Y, pattern, layout, dtype, device):
    x_SX, offsets_E = make_rows(T, E, K, X, pattern, dtype, device)
    w_EXY = make_weights(E, X, Y, layout, dtype, device)
    (y_SY,), (grad_x_SX, grad_w_EXY) = check_op(
        lambda x, w: ops.grouped_mm(x, w, offsets_E),
        lambda x, w: reference.grouped_mm(x, w, offsets_E),
        [x_SX, w_EXY], differentiable=(0, 1))
    end = offsets_E[-1].item()
    # Rows of dropped copies carry nothing, forward or backward.
    assert (y_SY[end:] == 0).all() and (grad_x_SX[end:] == 0).all()
    # An expert with no rows gets an exact zero gradient.
    empty_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)) == 0
    assert (grad_w_EXY[empty_E] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("T, E, K, X, Y, pattern", CASES)
def test_gather_grouped_mm_matches_reference(T, E, K, X, Y, pattern, layout, dtype, device):
    experts_TK = make_experts(T, E, K, pattern, device)
    offsets_E, row_map_TK = ops.expert_index(experts_TK, E)
    x_TX = torch.randn(T, X, device=device).to(dtype)
    w_EXY = make_weights(E, X, Y, layout, dtype, device)
    (y_SY,), (grad_x_TX, grad_w_EXY) = check_op(
        lambda x, w: ops.gather_grouped_mm(x, w, offsets_E, row_map_TK),
        lambda x, w: reference.grouped_mm(reference.permute(x, experts_TK, E)[0], w, offsets_E),
        [x_TX, w_EXY], differentiable=(0, 1))
    assert (y_SY[offsets_E[-1].item():] == 0).all()
    empty_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)) == 0
    assert (grad_w_EXY[empty_E] == 0).all()


def test_gather_grouped_mm_rejects_bad_row_map():
    x_TX, w_EXY = torch.randn(6, 4), torch.randn(3, 4, 5)
    offsets_E, row_map_TK = ops.expert_index(make_experts(6, 3, 2), 3)
    with pytest.raises(ValueError, match="row_map_TK must have one row per token"):
        ops.gather_grouped_mm(x_TX[:5], w_EXY, offsets_E, row_map_TK)
    with pytest.raises(TypeError, match="row_map_TK"):
        ops.gather_grouped_mm(x_TX, w_EXY, offsets_E, row_map_TK.long())


def test_tail_rows_are_zero_even_if_input_is_poisoned():
    """Rows past offsets_E[-1] are never read: NaN there must not leak anywhere."""
    E, X, Y = 4, 16, 8
    x_SX = torch.randn(20, X)
    x_SX[15:] = float("nan")
    offsets_E = torch.tensor([4, 4, 10, 15], dtype=torch.int32)
    w_EXY = torch.randn(E, X, Y, requires_grad=True)
    x_SX.requires_grad_()
    y_SY = ops.grouped_mm(x_SX, w_EXY, offsets_E)
    assert (y_SY[15:] == 0).all() and torch.isfinite(y_SY).all()
    grad_x_SX, grad_w_EXY = torch.autograd.grad(y_SY, (x_SX, w_EXY), torch.randn(20, Y))
    assert torch.isfinite(grad_w_EXY).all() and (grad_x_SX[15:] == 0).all()
    assert_close(y_SY[:15], reference.grouped_mm(x_SX[:15].detach(), w_EXY.detach(),
                                                 offsets_E))


def test_linear_layout_gradient_keeps_parameter_layout():
    """A parameter stored [E, Y, X] and passed transposed gets a plain [E, Y, X] grad."""
    E, X, Y = 4, 12, 20
    weight_EYX = torch.nn.Parameter(torch.randn(E, Y, X))
    x_SX = torch.randn(30, X)
    offsets_E = torch.tensor([5, 5, 20, 30], dtype=torch.int32)
    ops.grouped_mm(x_SX, weight_EYX.transpose(1, 2), offsets_E).square().sum().backward()
    want = weight_EYX.detach().clone().requires_grad_()
    reference.grouped_mm(x_SX, want.transpose(1, 2), offsets_E).square().sum().backward()
    assert weight_EYX.grad.shape == (E, Y, X) and weight_EYX.grad.is_contiguous()
    assert_close(weight_EYX.grad, want.grad)


def test_grouped_mm_non_contiguous_rows():
    x_SX = torch.randn(24, 40)[:, ::2]
    w_EXY = torch.randn(3, 20, 8)
    offsets_E = torch.tensor([8, 16, 24], dtype=torch.int32)
    assert_close(ops.grouped_mm(x_SX, w_EXY, offsets_E),
                 reference.grouped_mm(x_SX, w_EXY, offsets_E))


def _column_major_past_int32(S, X, dtype=torch.float16):
    """A column-major [S, X] view whose last element lies past 2^31 elements from its
    first (x[s, k] at s + k * 2^26): virtual memory, only the S * X used elements are
    written (a few pages each). fp16: 5 GB of address space, not 10."""
    stride = 2**26
    storage = torch.empty((X - 1) * stride + S, dtype=dtype)
    view = storage.as_strided((S, X), (1, stride))
    view.copy_(torch.randn(S, X, dtype=dtype))
    return view


def test_column_major_operands_past_int32_offsets():
    """The Triton kernels' in-row offsets are int32: such an x, or grad_y (a
    transposed output's gradient), was read outside the tensor (a segfault under the
    interpreter, an illegal address on a GPU)."""
    x_SX = _column_major_past_int32(16, 40)
    w_EXY = torch.randn(2, 40, 36, dtype=torch.float16, requires_grad=True)
    offsets_E = torch.tensor([6, 16], dtype=torch.int32)
    def same(got, want):  # the same sums, perhaps in another order (BLAS on the CPU)
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=0, atol=4e-3 * scale)

    y_SY = ops.grouped_mm(x_SX, w_EXY, offsets_E)
    want_SY = ops.grouped_mm(x_SX.contiguous(), w_EXY, offsets_E)
    same(y_SY, want_SY)
    dy_SY = _column_major_past_int32(16, 36)  # wgrad reads x and it in place
    got, = torch.autograd.grad(y_SY, w_EXY, dy_SY)
    want, = torch.autograd.grad(want_SY, w_EXY, dy_SY.contiguous())
    same(got, want)


# Segments of 1-4 rows (decoding) skip BLAS on the CPU (csrc/cpu/small_rows.h); 5 rows
# and up take it. Every count from 0 to 6 per expert, in one call, each weight layout
# (the strided one has neither dim contiguous: BLAS again), rows read in place from a
# strided x or gathered through token_S.
FEW_ROWS_COUNTS_E = [1, 0, 2, 3, 4, 5, 6, 1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["EXY", "EYX_T", "strided"])
@pytest.mark.parametrize("gather", [False, True], ids=["rows", "gather"])
def test_segments_of_a_few_rows_match_reference(gather, layout, dtype):
    counts_E = torch.tensor(FEW_ROWS_COUNTS_E)
    offsets_E = counts_E.cumsum(0).to(torch.int32)
    S, E, X, Y = int(counts_E.sum()), len(FEW_ROWS_COUNTS_E), 37, 29
    w_EXY = W_LAYOUTS[layout](torch.randn(E, X, Y).to(dtype))
    x_big = torch.randn(S + 3, 2 * X).to(dtype)
    if gather:  # every token once, in a shuffled order (top-1)
        x_TX = x_big[:S, :X].contiguous()
        row_map_TK = torch.randperm(S).to(torch.int32)[:, None]
        got = ops.gather_grouped_mm(x_TX, w_EXY, offsets_E, row_map_TK)
        token_S = torch.empty(S, dtype=torch.long)
        token_S[row_map_TK[:, 0].long()] = torch.arange(S)
        x_SX = x_TX[token_S]
    else:
        x_SX = x_big[3:, ::2][:, :X]  # rows 2X apart, not contiguous
        got = ops.grouped_mm(x_SX, w_EXY, offsets_E)
    want = reference.grouped_mm(x_SX.double(), w_EXY.double(), offsets_E)
    if dtype == torch.float32:
        assert_close(got, want.float())
    else:
        assert_close_to_reference(got, want, reference.grouped_mm(x_SX, w_EXY, offsets_E))
    # Deterministic: the same bits again.
    again = (ops.gather_grouped_mm(x_TX, w_EXY, offsets_E, row_map_TK) if gather
             else ops.grouped_mm(x_SX, w_EXY, offsets_E))
    assert torch.equal(got, again)


def test_a_few_rows_over_a_long_reduction_are_as_accurate_as_blas():
    """fp32, w's rows contiguous, X = 4096: a single running sum over X was 9x BLAS's
    error against fp64; the row sums now go by blocks of rows."""
    if TRITON_INTERPRETED:
        pytest.skip("DSV3_BACKEND=triton replaced the C++ kernels for this process")
    gen = torch.Generator().manual_seed(0)
    x_SX, w_EXY = torch.randn(2, 4096, generator=gen), torch.randn(1, 4096, 64, generator=gen)
    got = ops.grouped_mm(x_SX, w_EXY, torch.tensor([2], dtype=torch.int32))
    exact = x_SX.double() @ w_EXY[0].double()
    blas_error = (x_SX @ w_EXY[0] - exact).abs().max().item()
    assert (got.double() - exact).abs().max().item() <= 2 * blas_error


def test_a_few_rows_of_another_dtype_than_the_weights_are_refused():
    """The raw op skips the Python checks: rows of another dtype must not be read as
    the weights' dtype by the few-rows path. The kernels refuse them (the Triton
    launcher too), naming both arguments."""
    with pytest.raises(TypeError, match="grouped_mm: x and w_EXY must have one dtype, got "):
        torch.ops.dsv3.grouped_mm(torch.randn(2, 8), torch.randn(1, 8, 4).to(torch.bfloat16),
                                  torch.tensor([2], dtype=torch.int32))


# Rows per expert for the launch-variant tests: empty experts (first and in the middle),
# a single-row expert, one of over two 32-row steps (the interpreter's BLOCK_M and
# BLOCK_K: the forward's row tiles, the wgrad's reduction) ending in a partial one, one
# of whole steps only (128: 32- and 64-row steps, as on a GPU); the VARIANT_DROPPED rows
# after the last expert are dropped copies.
VARIANT_COUNTS_E = [0, 1, 37, 0, 70, 128, 5]
VARIANT_DROPPED = 3
# Nearly even rows per expert, an empty one among them: the flattened wgrad walks them
# all in its uniform loop, every tile running the longest expert's steps, at most a
# quarter more than the experts' own (on the CPU's BLOCK_K = 16: 7 steps x 8 experts
# against 45, just inside; on a GPU's 64: 2 x 8 against 13). Experts of fewer steps
# (64 rows: 4 of 16, 1 of 64) run whole steps past their end, and most end inside a
# step. VARIANT_COUNTS_E's are too uneven for it (8 steps x 7 against 18) and go to the
# nested loop. (A GPU runs each list 100 times over, variant_offsets: the same ratios.)
EVEN_COUNTS_E = [110, 64, 109, 109, 82, 0, 101, 112]


def triton_grouped_gemm(device, dtype):
    """The Triton kernels and their config module, or a skip where they cannot run."""
    grouped_gemm = pytest.importorskip("dsv3.kernels.grouped_gemm")  # triton is optional
    from dsv3.kernels import config
    if device == "cpu" and not config.INTERPRET:
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter's bf16 tl.dot is wrong")
    return grouped_gemm, config


def variant_offsets(device, counts=VARIANT_COUNTS_E):
    """offsets_E of ``counts``; 100 times over on a GPU, whose persistent launch has a
    program or more per SM (264 on an H200 at 128 x 128), so that each walks several
    tiles as the interpreter's 3 programs do."""
    counts_E = torch.tensor(counts * (1 if device == "cpu" else 100))
    return counts_E, counts_E.cumsum(0).to(torch.int32)


def wgrad_loop(x_SX, dy_SY, offsets_E):
    """dw[e] = x_e^T @ dy_e, expert by expert: the wgrad tests' reference."""
    starts = [0, *offsets_E[:-1].tolist()]
    return torch.stack([x_SX[s:e].T @ dy_SY[s:e] for s, e in zip(starts, offsets_E.tolist())])


# Views of w_EXY's values in other layouts (made on the device: a copy there would
# make a non-dense view contiguous).
W_LAYOUTS = {
    "EXY": lambda w_EXY: w_EXY,
    # nn.Linear's [E, Y, X], transposed: TMA reads it K-major
    "EYX_T": lambda w_EXY: w_EXY.transpose(1, 2).contiguous().transpose(1, 2),
    # no contiguous dim: TMA cannot read it, the pointer loads take over
    "strided": lambda w_EXY: w_EXY.repeat_interleave(2, dim=2)[:, :, ::2],
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(W_LAYOUTS))
@pytest.mark.parametrize("gather", [False, True], ids=["rows", "gather"])
@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flat"])
def test_forward_launch_variants_match_reference(flatten, tma, gather, layout, dtype, device):
    """Both forward loads (pointers, TMA descriptors), with the tile and step loops
    nested or flattened, whatever configs the autotuner holds (the interpreter and
    DSV3_AUTOTUNE=0 keep the pointer nested one only), against a per-expert loop.
    Gathered rows, fp32 and the strided w take the pointer loads. (The interpreter runs
    the flattened loop nested: the flattening is Triton's, on a GPU.)"""
    check_forward_variant(flatten, tma, gather, layout, dtype, device)


def check_forward_variant(flatten, tma, gather, layout, dtype, device, launch_config=None):
    """The forward launched with ``launch_config`` (a GPU autotuner config as it is), or
    else with the first tile as ``flatten`` and ``tma`` say, against a per-expert loop."""
    grouped_gemm, config = triton_grouped_gemm(device, dtype)
    # X = 40, Y = 72: multiples of 8 (16-byte rows in 16-bit dtypes, as TMA needs), not
    # of any block, so the last k step and column tile run past the ends. Flattened, X =
    # 200: several k steps a tile on a GPU too (BLOCK_K 64), whose fused loop must start
    # each tile's sum afresh.
    X, Y = (200 if flatten else 40), 72
    counts_E, offsets_E = variant_offsets(device)
    n_rows = offsets_E[-1].item() + VARIANT_DROPPED
    x_SX = torch.randn(n_rows, X).to(dtype)
    # Dropped copies: TMA loads them into the last expert's tile, and only the masked
    # store keeps their NaN out of the output, which must be zero there.
    x_SX[-VARIANT_DROPPED:] = float("nan")
    token_S = torch.randperm(n_rows) if gather else None
    if gather:  # row s reads x_TX[token_S[s]], which holds x_SX[s]
        x_TX = torch.empty_like(x_SX)
        x_TX[token_S] = x_SX
    w_EXY = (torch.randn(len(counts_E), X, Y) / X**0.5).to(dtype)
    x, w, offsets = (t.to(device) for t in (x_TX if gather else x_SX, w_EXY, offsets_E))
    w = W_LAYOUTS[layout](w)
    tokens = token_S.to(device, torch.int32) if gather else None
    # TMA reads these inputs: w, and x unless gathered (its rows keep to pointer loads)
    tma_readable = dtype != torch.float32 and layout != "strided"
    descriptors = grouped_gemm.tma_descriptors(x, w, gathered=gather)
    assert (descriptors is not None) == (tma_readable and grouped_gemm.has_tma(x.device))
    assert descriptors is None or (descriptors[0] is None) == gather
    # NaN where the output will likely be allocated (CUDA's caching allocator): an
    # unwritten row fails.
    torch.full((n_rows, Y), float("nan"), dtype=dtype, device=device)
    # BLOCK_K = BLOCK_N / 2, as on a GPU (64 of 128), not the interpreter's square 32s:
    # a w tile read in the wrong shape fails here too.
    tiles = config.matmul_configs()[0]
    launch = launch_config or config.config_with(tiles, USE_TMA=tma, FLATTEN=flatten,
                                                 BLOCK_K=tiles.kwargs["BLOCK_N"] // 2)
    y_SY = grouped_gemm.grouped_mm_with(launch, x, w, offsets, tokens).cpu()
    assert (y_SY[-VARIANT_DROPPED:] == 0).all()

    def forward_loop(x, w):
        bounds = zip([0, *offsets_E[:-1].tolist()], offsets_E.tolist())
        return torch.cat([x[s:e] @ w[i] for i, (s, e) in enumerate(bounds)])

    x_SX = x_SX[:-VARIANT_DROPPED]
    if dtype in (torch.float16, torch.bfloat16):
        assert_close_to_reference(y_SY[:-VARIANT_DROPPED],
                                  forward_loop(x_SX.double(), w_EXY.double()),
                                  forward_loop(x_SX, w_EXY))
    else:
        assert_close(y_SY[:-VARIANT_DROPPED], forward_loop(x_SX, w_EXY))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gather", [False, True], ids=["rows", "gather"])
@pytest.mark.parametrize("transposed", [False, True], ids=["EXY", "EYX"])
@pytest.mark.parametrize("persistent", [False, True], ids=["grid", "persistent"])
@pytest.mark.parametrize("tma", [False, True], ids=["pointer", "tma"])
def test_wgrad_launch_variants_match_reference(tma, persistent, transposed, gather, dtype,
                                               device):
    """Both wgrad launches, each with pointer and TMA loads, whatever configs the
    autotuner holds (the interpreter and DSV3_AUTOTUNE=0 keep the pointer grid one
    only), against a per-expert loop. TMA takes whole BLOCK_K steps of an expert's
    rows; the counts leave a partial last step (pointers), and the NaN rows past the
    last expert check that no step reads beyond its expert."""
    check_wgrad_variant(tma, persistent, transposed, gather, dtype, device, dim_x=40)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("persistent", [False, True], ids=["grid", "persistent"])
def test_wgrad_tma_with_x_unreadable_by_tma(persistent, dtype, device):
    """X = 36: x's 72-byte rows are no multiple of 16 bytes, so TMA reads dy alone and
    x's own rows go through pointers (not through a token index: none is given)."""
    check_wgrad_variant(True, persistent, False, False, dtype, device, dim_x=36)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True], ids=["EXY", "EYX"])
@pytest.mark.parametrize("counts", [EVEN_COUNTS_E, VARIANT_COUNTS_E], ids=["even", "skewed"])
def test_wgrad_flattened_walk_matches_reference(counts, transposed, dtype, device):
    """The persistent TMA wgrad with FLATTEN: nearly even routing takes the uniform
    flattened loop (descriptors built per tile over the expert's rows, every tile
    running the longest expert's steps, an empty expert's tiles zeros), skewed routing
    the nested loop it falls back to (tests/test_wgrad_uniform_walk.py
    checks which). X = 200: two rows of dw tiles on a GPU too (BLOCK_M 128). (The
    interpreter runs the flattened loop nested: the flattening is Triton's.)"""
    check_wgrad_variant(True, True, transposed, False, dtype, device, dim_x=200, flatten=True,
                        counts=counts)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unreadable", ["x_strided", "dy_expanded", "dy_rows_repeated"])
def test_wgrad_flattened_walk_leaves_inputs_tma_cannot_read_to_the_nested_loop(unreadable,
                                                                              device):
    """A FLATTEN config launched where TMA cannot read x or dy (as the autotuner's pick
    for a key is reused on later calls: here a one-config tuner, which prunes nothing)
    computes the right gradient through the nested loop's pointer loads: a strided x,
    an expanded dy (autograd's gradient of a sum, strides 0), and one whose rows repeat
    a row (strides (0, 1): TMA is not trusted with a zero stride)."""
    grouped_gemm, config = triton_grouped_gemm(device, torch.float16)
    X, Y = 40, 72
    counts_E, offsets_E = variant_offsets(device, EVEN_COUNTS_E)  # would take the flat walk
    n_rows = offsets_E[-1].item()
    x_SX = torch.randn(n_rows, 2 * X, dtype=torch.float16, device=device)
    dy_SY = torch.randn(n_rows, Y, dtype=torch.float16, device=device)
    if unreadable == "x_strided":
        x_SX = x_SX[:, ::2]
    else:
        shape = () if unreadable == "dy_expanded" else (Y,)
        dy_SY = torch.randn(shape, dtype=torch.float16, device=device).expand(n_rows, Y)
        x_SX = x_SX[:, :X].contiguous()
    descriptors = grouped_gemm.wgrad_descriptors(x_SX, dy_SY, gathered=False)
    assert descriptors is None or descriptors[0] is None  # no TMA for dy, or none for x
    launch = config.config_with(config.wgrad_configs()[0], PERSISTENT=True, USE_TMA=True,
                                FLATTEN=True)
    if device == "cpu":  # a GPU's shape of blocks (see check_wgrad_variant)
        launch = config.config_with(launch, BLOCK_N=64, BLOCK_K=16)
    grad_w_EXY = grouped_gemm.grouped_mm_wgrad_with(launch, x_SX, dy_SY, offsets_E.to(device),
                                                    False)
    x_SX, dy_SY = x_SX.cpu(), dy_SY.cpu()
    assert_close_to_reference(grad_w_EXY.cpu(),
                              wgrad_loop(x_SX.double(), dy_SY.double(), offsets_E),
                              wgrad_loop(x_SX, dy_SY, offsets_E))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim_x, copied_first", [(40, True), (96, False)],
                         ids=["X_le_Y_copied", "X_gt_Y_gathered"])
def test_gathered_wgrad_copies_its_rows_first_where_no_larger_than_grad_y(
        dim_x, copied_first, dtype, device, monkeypatch):
    """The tuned Triton wgrad copies the gathered rows first where X <= Y (the plain
    kernel on the copy is faster on an H200) and gathers in the kernel otherwise. Both
    match a loop, with a dropped copy's -1 token and NaN grad rows past the last expert
    left unread."""
    grouped_gemm, _ = triton_grouped_gemm(device, dtype)
    copies = []
    monkeypatch.setattr(torch.Tensor, "index_select",
                        lambda t, *a, original=torch.Tensor.index_select:
                        copies.append(t.shape) or original(t, *a))
    X, Y, T = dim_x, 72, 50
    counts_E, offsets_E = variant_offsets(device)
    n_rows = offsets_E[-1].item() + VARIANT_DROPPED
    x_TX = torch.randn(T, X).to(dtype)
    token_S = torch.randint(0, T, (n_rows,), dtype=torch.int32)
    token_S[-VARIANT_DROPPED:] = -1  # a dropped copy's row: never read
    dy_SY = torch.randn(n_rows, Y).to(dtype)
    dy_SY[-VARIANT_DROPPED:] = float("nan")
    args = [t.to(device) for t in (x_TX, dy_SY, offsets_E, token_S)]
    grad_w_EXY = grouped_gemm.grouped_mm_wgrad(*args[:3], False, args[3]).cpu()
    assert (copies == [x_TX.shape]) == copied_first
    x_SX, dy_SY = x_TX[token_S[:-VARIANT_DROPPED].long()], dy_SY[:-VARIANT_DROPPED]
    if dtype == torch.float32:
        assert_close(grad_w_EXY, wgrad_loop(x_SX, dy_SY, offsets_E))
    else:
        assert_close_to_reference(grad_w_EXY,
                                  wgrad_loop(x_SX.double(), dy_SY.double(), offsets_E),
                                  wgrad_loop(x_SX, dy_SY, offsets_E))


def check_wgrad_variant(tma, persistent, transposed, gather, dtype, device, dim_x,
                        flatten=False, counts=VARIANT_COUNTS_E, launch_config=None):
    """The wgrad launched with ``launch_config`` (a GPU autotuner config as it is), or
    else with the first tile as the flags say, against a per-expert loop."""
    grouped_gemm, config = triton_grouped_gemm(device, dtype)
    X, Y, T = dim_x, 72, 50  # several tiles per expert at the interpreter's 32 x 32
    counts_E, offsets_E = variant_offsets(device, counts)
    n_rows = offsets_E[-1].item() + VARIANT_DROPPED
    x_TX = torch.randn(T if gather else n_rows, X).to(dtype)
    token_S = torch.randint(0, T, (n_rows,), dtype=torch.int32) if gather else None
    dy_SY = torch.randn(n_rows, Y).to(dtype)
    dy_SY[-VARIANT_DROPPED:] = float("nan")  # dropped copies: never read
    args = [t.to(device) if t is not None else None for t in (x_TX, dy_SY, offsets_E, token_S)]
    # Leave NaN in the memory the output will likely reuse (CUDA's caching allocator),
    # so that a tile the kernel does not write, an empty expert's included, fails.
    torch.full((len(counts_E), X, Y), float("nan"), dtype=dtype, device=device)
    if tma:  # TMA reads dy here, and x unless gathered or unaligned
        descriptors = grouped_gemm.wgrad_descriptors(args[0], args[1], gather)
        assert ((descriptors is not None)
                == (dtype != torch.float32 and grouped_gemm.has_tma(args[0].device)))
        assert descriptors is None or (descriptors[0] is None) == (gather or X % 8 != 0)
    launch = launch_config or config.config_with(config.wgrad_configs()[0],
                                                 PERSISTENT=persistent, USE_TMA=tma,
                                                 FLATTEN=flatten)
    if device == "cpu" and launch_config is None:
        # Non-square blocks, as on a GPU (128 x 128 x 64), not the interpreter's 32s: a
        # descriptor box or a tile read in the wrong shape fails here. BLOCK_K = 16 also
        # gives the experts of 37 and 70 rows two and four whole TMA steps.
        block_m = launch.kwargs["BLOCK_M"]
        launch = config.config_with(launch, BLOCK_N=2 * block_m, BLOCK_K=block_m // 2)
    grad_w = grouped_gemm.grouped_mm_wgrad_with(launch, *args[:3], transposed, args[3]).cpu()
    assert grad_w.is_contiguous()
    grad_w_EXY = grad_w.transpose(1, 2) if transposed else grad_w
    assert (grad_w_EXY[counts_E == 0] == 0).all()

    x_SX = (x_TX[token_S.long()] if gather else x_TX)[:-VARIANT_DROPPED]
    dy_SY = dy_SY[:-VARIANT_DROPPED]

    if dtype in (torch.float16, torch.bfloat16):
        assert_close_to_reference(grad_w_EXY,
                                  wgrad_loop(x_SX.double(), dy_SY.double(), offsets_E),
                                  wgrad_loop(x_SX, dy_SY, offsets_E))
    else:
        assert_close(grad_w_EXY, wgrad_loop(x_SX, dy_SY, offsets_E))


@pytest.mark.gpu
def test_autotuner_compiling_side_by_side_on_the_gpu(monkeypatch):
    """dsv3/kernels/tuning.py on a real device: a new key's configs compile in threads
    (each told the device), the autotuner then times those kernels without compiling
    again, and its pick computes the right thing."""
    import threading

    from triton.runtime.jit import JITFunction
    grouped_gemm, config = triton_grouped_gemm("cuda", torch.bfloat16)
    from dsv3.kernels import autotune_cache, tuning
    monkeypatch.setattr(tuning, "COMPILE_THREADS", 4)  # whatever the machine's cores
    monkeypatch.setattr(autotune_cache, "ENABLED", False)  # no picks from an earlier run
    on_main_thread = []
    compile = JITFunction._do_compile

    def counted(self, *args, **kwargs):
        on_main_thread.append(threading.current_thread() is threading.main_thread())
        return compile(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "_do_compile", counted)
    tiles = [config.config_with(config.matmul_configs()[0], BLOCK_M=m, BLOCK_N=n, USE_TMA=tma)
             for m, n, tma in [(128, 128, False), (64, 128, False), (128, 128, True)]]
    tuner = grouped_gemm._forward_tuner(tiles)
    counts_E, offsets_E = variant_offsets("cpu")
    x_SX = torch.randn(int(offsets_E[-1]), 64, dtype=torch.bfloat16)
    w_EXY = torch.randn(len(counts_E), 64, 96, dtype=torch.bfloat16) / 8
    y_SY = grouped_gemm._forward(tuner, x_SX.cuda(), w_EXY.cuda(), offsets_E.cuda(), None)
    assert on_main_thread.count(True) == 1 and len(on_main_thread) == len(tiles)
    assert len(tuner.cache) == 1
    expected = reference.grouped_mm(x_SX.double(), w_EXY.double(), offsets_E)
    assert_close_to_reference(y_SY.cpu(), expected, reference.grouped_mm(x_SX, w_EXY, offsets_E))
