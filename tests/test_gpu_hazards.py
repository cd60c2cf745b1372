"""Hazards that Triton's sequential interpreter hides and a GPU shows: here, memory a
kernel leaves unwritten. The interpreter's (and the CPU allocator's) fresh memory is
often zeros, so a row a kernel never writes can pass a test that compares with zeros;
on a GPU the caching allocator hands back whatever the last kernel left. Every fresh
allocation made while a kernel's launcher runs is poisoned here (NaN for floats, the
smallest value or 0 for integers: 0 is a "bad input" flag, the smallest value an
out-of-range index), so an element left unwritten shows up whatever the allocator does.

The routings are the degenerate ones: empty experts (first, middle, last),
dropped copies (expert -1, rows past offsets_E[-1]), all copies on one expert, a token
count and widths that are multiples of no block. Each output must be finite and equal,
bit for bit, to an unpoisoned run (the kernels are deterministic: no atomics on floats).

Also here: launchers that indexed strided 1-D views as dense, and the quantize kernels'
64-bit block ids (int32 ids wrapped at 2^31 blocks). The other hazards of the GPU review
(races, atomics, barriers, grids, streams) cannot be shown by the interpreter; the
review's notes are in the kernels' comments.
"""
import contextlib

import pytest
import torch

from dsv3 import reference

triton = pytest.importorskip("triton")  # the Triton kernels are optional

from dsv3.kernels import (config, gpt_oss_glu, grouped_gemm, permute, quantize,  # noqa: E402
                          router, router_backward, swiglu)

# The interpreter runs Triton on CPU tensors; on a GPU the same tests run natively.
DEVICES = ([pytest.param("cpu", marks=pytest.mark.skipif(
    not config.INTERPRET, reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1"))]
    + [pytest.param("cuda", marks=pytest.mark.gpu)])
# Poison for integer allocations: 0 (an unwritten "input was good" flag reads as bad)
# and the smallest value (an unwritten index reads as out of range).
INT_POISONS = [0, "min"]


def _poison(tensor: torch.Tensor, int_poison) -> torch.Tensor:
    if tensor.is_floating_point():
        tensor.fill_(float("nan"))
    elif tensor.dtype != torch.bool and tensor.numel():
        tensor.fill_(torch.iinfo(tensor.dtype).min if int_poison == "min" else int_poison)
    return tensor


@contextlib.contextmanager
def poisoned_allocations(int_poison):
    """torch.empty, torch.empty_like and Tensor.new_empty return poisoned memory."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    torch.empty = lambda *a, **k: _poison(empty(*a, **k), int_poison)
    torch.empty_like = lambda *a, **k: _poison(empty_like(*a, **k), int_poison)
    torch.Tensor.new_empty = lambda self, *a, **k: _poison(new_empty(self, *a, **k), int_poison)
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty


def run_poisoned(int_poison, kernel, *args):
    """``kernel(*args)`` with poisoned allocations, and without; the outputs (tuples of
    tensors), asserted equal bit for bit and finite where floating."""
    with poisoned_allocations(int_poison):
        poisoned = kernel(*args)
    clean = kernel(*args)
    poisoned = poisoned if isinstance(poisoned, tuple) else (poisoned,)
    clean = clean if isinstance(clean, tuple) else (clean,)
    for i, (p, c) in enumerate(zip(poisoned, clean)):
        if p.is_floating_point():
            assert torch.isfinite(p).all(), f"output {i} has unwritten (poisoned) elements"
        torch.testing.assert_close(p, c, rtol=0, atol=0, equal_nan=True,
                                   msg=f"output {i} depends on uninitialised memory")
    return poisoned


# Experts per copy ([T, K]) for the permute and GEMM tests: expert 0, 2 and 5 (the
# last) empty, expert 3 takes most copies, -1 copies are dropped (rows past
# offsets_E[-1]).
N_EXPERTS = 6


def make_experts(n_tokens: int, top_k: int) -> torch.Tensor:
    experts_TK = torch.full((n_tokens, top_k), 3, dtype=torch.int32)
    experts_TK[::3, 0] = 1
    experts_TK[1::4, -1] = 4
    experts_TK[2::5, 0] = -1
    return experts_TK


@pytest.mark.parametrize("int_poison", INT_POISONS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("routing", [
    dict(score="softmax", n_groups=1, topk_groups=1, bias=False, stats=False),  # Mixtral
    dict(score="sigmoid", n_groups=4, topk_groups=2, bias=True, stats=True),  # DeepSeek-V3
])
def test_route_writes_every_output(routing, device, int_poison):
    """T = 37 (not a multiple of the 16 tokens a program), E = 16, K = 3: the weights,
    ids, counts and each program's partial sums (poisoned: torch.empty), then the
    backward's dense gradient."""
    n_tokens, n_experts, top_k = 37, 16, 3
    logits_TE = torch.randn(n_tokens, n_experts, device=device)
    bias_E = torch.randn(n_experts, device=device) if routing["bias"] else None
    args = (logits_TE, top_k, routing["score"], bias_E, routing["n_groups"],
            routing["topk_groups"], True, 2.5, routing["stats"])
    weights_TK, experts_TK, counts_E, *_ = run_poisoned(int_poison, router.route, *args)
    assert ((experts_TK >= 0) & (experts_TK < n_experts)).all()
    assert counts_E.sum().item() == n_tokens * top_k
    grad_w_TK = torch.randn(n_tokens, top_k, device=device)
    grad_sum_E = torch.randn(n_experts, device=device) if routing["stats"] else None
    grad_z = torch.tensor(0.5, device=device) if routing["stats"] else None
    run_poisoned(int_poison, router_backward.route_backward, grad_w_TK, grad_sum_E, grad_z,
                 logits_TE, experts_TK, routing["score"], True, 2.5)


@pytest.mark.parametrize("int_poison", INT_POISONS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_permute_and_combine_write_every_row(dtype, device, int_poison):
    """D = 100 (two column blocks of the interpreter's 64, the last partial), dropped
    copies and empty experts: x_SD, y_TD, grad_y_SD and grad_weights_TK."""
    n_tokens, top_k, dim = 11, 3, 100
    _, row_map_TK = reference.expert_index(make_experts(n_tokens, top_k), N_EXPERTS)
    row_map_TK = row_map_TK.to(device)
    x_TD = torch.randn(n_tokens, dim, device=device, dtype=dtype)
    x_SD, = run_poisoned(int_poison, permute.permute_rows, x_TD, row_map_TK)
    weights_TK = torch.rand(n_tokens, top_k, device=device)
    run_poisoned(int_poison, permute.unpermute, x_SD, row_map_TK, weights_TK)
    run_poisoned(int_poison, permute.unpermute, x_SD, row_map_TK, None)
    grad_y_TD = torch.randn(n_tokens, dim, device=device, dtype=dtype)
    run_poisoned(int_poison, permute.unpermute_backward, grad_y_TD, x_SD, row_map_TK,
                 weights_TK)


@pytest.mark.parametrize("int_poison", INT_POISONS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gather", [False, True], ids=["rows", "gather"])
@pytest.mark.parametrize("experts", ["mixed", "one_expert"])
def test_grouped_mm_writes_every_row_and_weight(experts, gather, device, int_poison):
    """The forward writes every row (the dropped copies' tail: zeros), the wgrad every
    expert's matrix (empty ones: zeros), in both wgrad launches (grid, persistent)."""
    n_tokens, top_k, dim_x, dim_y = 13, 3, 40, 36
    experts_TK = make_experts(n_tokens, top_k)
    if experts == "one_expert":
        experts_TK = torch.full_like(experts_TK, N_EXPERTS - 1)
    offsets_E, row_map_TK = reference.expert_index(experts_TK, N_EXPERTS)
    n_rows = n_tokens * top_k
    token_S = torch.empty(n_rows, dtype=torch.int32)
    token_S[row_map_TK.flatten().long()] = torch.arange(n_tokens, dtype=torch.int32
                                                        ).repeat_interleave(top_k)
    x_SX = torch.randn(n_rows, dim_x)
    x = (x_SX[:n_tokens] if gather else x_SX).to(device)
    tokens = token_S.to(device) if gather else None
    offsets_E = offsets_E.to(device)
    w_EXY = torch.randn(N_EXPERTS, dim_x, dim_y, device=device) / dim_x**0.5
    y_SY, = run_poisoned(int_poison, grouped_gemm.grouped_mm, x, w_EXY, offsets_E, tokens)
    assert (y_SY[offsets_E[-1].item():] == 0).all()
    grad_y_SY = torch.randn(n_rows, dim_y, device=device)
    counts_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1))
    for persistent in (False, True):
        launch = config.config_with(config.wgrad_configs()[0], PERSISTENT=persistent)
        grad_w, = run_poisoned(int_poison, grouped_gemm.grouped_mm_wgrad_with, launch, x,
                               grad_y_SY, offsets_E, False, tokens)
        assert (grad_w[counts_E == 0] == 0).all()


@pytest.mark.parametrize("int_poison", [0])
@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_and_quantize_write_every_element(device, int_poison):
    """S * F = 7 * 13 (a multiple of no block) for SwiGLU; 1000 values in blocks of 128
    (the last partial) for the int8 quantization and its two-rank reduce."""
    h_S2F = torch.randn(7, 26, device=device)
    a_SF, = run_poisoned(int_poison, swiglu.swiglu, h_S2F)
    run_poisoned(int_poison, swiglu.swiglu_backward, torch.randn_like(a_SF), h_S2F)
    x_N = torch.randn(1000, device=device)
    q_N, scales_B, _ = run_poisoned(int_poison, quantize.quantize_int8, x_N, 128,
                                    torch.randn(1000, device=device))
    run_poisoned(int_poison, quantize.dequantize_int8, torch.stack([q_N, q_N]),
                 torch.stack([scales_B, scales_B]), 128)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("limit", [None, 1.0])
def test_gpt_oss_glu_writes_every_element(limit, device):
    """S * F = 7 * 13 (a multiple of no block, pairs crossing rows): every output and
    both interleaved gradients, clamped and not."""
    h_S2F = torch.randn(7, 26, device=device)
    a_SF, = run_poisoned(0, gpt_oss_glu.gpt_oss_glu, h_S2F, 1.702, limit)
    run_poisoned(0, gpt_oss_glu.gpt_oss_glu_backward, torch.randn_like(a_SF), h_S2F, 1.702,
                 limit)


# Launchers that passed a 1-D tensor to a kernel indexing it as ptr + i read a strided
# view's memory, not its values (no GPU needed to see it, but the GPU path only: the C++
# kernels make them contiguous): bias_E picked experts by other experts' biases,
# offsets_E split the rows wrongly (or raised), q/scales summed other values.
def _strided(t: torch.Tensor) -> torch.Tensor:
    """A view of ``t``'s values with stride 2 (every other element of a larger tensor)."""
    wide = torch.zeros(t.shape[0] * 2, *t.shape[1:], dtype=t.dtype, device=t.device)
    wide[::2] = t
    return wide[::2]


@pytest.mark.parametrize("device", DEVICES)
def test_strided_bias_routes_as_its_values(device):
    logits_TE = torch.randn(20, 16, device=device)
    bias_E = torch.randn(16, device=device) * 3
    args = (2, "sigmoid")
    strided = router.route(logits_TE, *args, _strided(bias_E), 4, 2, True, 1.0, False)
    dense = router.route(logits_TE, *args, bias_E, 4, 2, True, 1.0, False)
    assert torch.equal(strided[1], dense[1]) and torch.equal(strided[0], dense[0])


@pytest.mark.parametrize("device", DEVICES)
def test_strided_offsets_split_rows_as_their_values(device):
    x_SX = torch.randn(12, 8, device=device)
    w_EXY = torch.randn(3, 8, 5, device=device)
    offsets_E = torch.tensor([4, 4, 10], dtype=torch.int32, device=device)
    y_SY = grouped_gemm.grouped_mm(x_SX, w_EXY, _strided(offsets_E))
    torch.testing.assert_close(y_SY, grouped_gemm.grouped_mm(x_SX, w_EXY, offsets_E),
                               rtol=0, atol=0)
    grad_y_SY = torch.randn(12, 5, device=device)
    torch.testing.assert_close(
        grouped_gemm.grouped_mm_wgrad(x_SX, grad_y_SY, _strided(offsets_E), False),
        grouped_gemm.grouped_mm_wgrad(x_SX, grad_y_SY, offsets_E, False), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_quantized_chunk_dequantizes_as_its_values(device):
    q_N, scales_B, _ = quantize.quantize_int8(torch.randn(1000, device=device), 128, None)
    torch.testing.assert_close(quantize.dequantize_int8(_strided(q_N), _strided(scales_B), 128),
                               quantize.dequantize_int8(q_N, scales_B, 128), rtol=0, atol=0)


def test_quantize_block_ids_widen_before_int32_wraps():
    """Block ids are int32 in the kernels unless the last program's reach 2^31, which
    block_size 1 on a 2^31-value tensor does (they wrapped negative: scales read and
    written outside their tensor); 64-bit ids cost registers, so only then."""
    assert not quantize._wide_ids(2**20, 2048)
    assert not quantize._wide_ids(2**31 - 2048, 2048)
    assert quantize._wide_ids(2**31 - 2047, 2048)  # its last program's ids reach 2^31
    assert quantize._wide_ids(3_800_000_000, 2048)


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_wide_block_ids_give_the_same_bits(device, monkeypatch):
    """The 64-bit block-id variant (too big to run here at its real size) against the
    int32 one, forced on a small tensor."""
    x_N, error_N = torch.randn(1000, device=device), torch.randn(1000, device=device)
    narrow = quantize.quantize_int8(x_N, 128, error_N)
    narrow_sum = quantize.dequantize_int8(torch.stack([narrow[0]] * 2),
                                          torch.stack([narrow[1]] * 2), 128)
    monkeypatch.setattr(quantize, "_wide_ids", lambda n_blocks, blocks: True)
    wide = quantize.quantize_int8(x_N, 128, error_N)
    wide_sum = quantize.dequantize_int8(torch.stack([wide[0]] * 2),
                                        torch.stack([wide[1]] * 2), 128)
    for w, n in zip((*wide, wide_sum), (*narrow, narrow_sum)):
        torch.testing.assert_close(w, n, rtol=0, atol=0, equal_nan=True)
