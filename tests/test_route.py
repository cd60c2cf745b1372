"""dsv3.ops.route against reference.route: expert ids and counts exactly, weights
and d(logits) within the dtype's tolerance, over the routing variants and edge cases,
with groups scored both ways (group_score "top2_sum", DeepSeek-V3's, and "max",
DeepSeek-V2's)."""
import pytest
import torch

from conftest import DEVICES, DTYPES, TRITON_INTERPRETED, assert_close, check_op
from dsv3 import ops, reference

# Tokens of the medium cases: several of the C++ kernel's 64-token parallel chunks. The
# interpreter pass runs the Triton kernel, 16 tokens a program and about 40 ms a token
# there: 160 tokens are still 10 programs.
MEDIUM_T = 160 if TRITON_INTERPRETED else 700

# (T, E, K, score, with_bias, n_groups, topk_groups, normalize, scale, logits pattern)
CASES = [
    # Mixtral's router: softmax top-2, normalized.
    pytest.param(64, 8, 2, "softmax", False, 1, 1, True, 1.0, "random", id="mixtral"),
    # T = 1: a single token.
    pytest.param(1, 8, 2, "softmax", False, 1, 1, True, 1.0, "random", id="T1"),
    # K = E: every expert chosen by every token.
    pytest.param(16, 6, 6, "softmax", False, 1, 1, True, 1.0, "random", id="K_eq_E"),
    # Prime E, T·K = 39 not a multiple of any block (the CPU grain is 64 tokens).
    pytest.param(13, 7, 3, "softmax", False, 1, 1, True, 1.0, "random", id="primeE7_TK39"),
    # Prime E = 13, K = 1, T = 65 crosses the 64-token parallel grain by one.
    pytest.param(65, 13, 1, "softmax", False, 1, 1, True, 1.0, "random", id="primeE13_K1_T65"),
    # All tokens to one expert: one logit dominates every row.
    pytest.param(33, 8, 1, "softmax", False, 1, 1, True, 1.0, "one_expert", id="one_expert"),
    # Softmax without normalization and with scale != 1.
    pytest.param(40, 8, 2, "softmax", False, 1, 1, False, 0.5, "random", id="softmax_raw_scale"),
    # Softmax with a selection bias.
    pytest.param(40, 8, 3, "softmax", True, 1, 1, True, 1.0, "random", id="softmax_bias"),
    # Sigmoid scores, normalized.
    pytest.param(40, 8, 2, "sigmoid", False, 1, 1, True, 1.0, "random", id="sigmoid"),
    # Sigmoid without normalization, scale != 1.
    pytest.param(40, 8, 2, "sigmoid", False, 1, 1, False, 2.5, "random", id="sigmoid_raw_scale"),
    # DeepSeek-V3: sigmoid + bias + group-limited (4 groups, 2 kept) + scale 2.5.
    pytest.param(50, 16, 4, "sigmoid", True, 4, 2, True, 2.5, "random", id="deepseek_groups"),
    # Groups of one expert: the group score is that expert's score alone.
    pytest.param(30, 4, 2, "sigmoid", True, 4, 2, True, 1.0, "random", id="group_size_1"),
    # Group-limited softmax, K = all experts of the kept groups.
    pytest.param(30, 12, 6, "softmax", False, 3, 2, True, 1.0, "random",
                 id="softmax_groups_K_full"),
    # Degenerate all-equal rows: ties everywhere, must all go to the lowest indices.
    pytest.param(20, 8, 3, "softmax", False, 1, 1, True, 1.0, "equal", id="ties_equal_rows"),
    # Heavy ties (integer logits) under group-limited selection with bias-free sigmoid.
    pytest.param(40, 8, 3, "sigmoid", False, 4, 2, True, 1.0, "integer", id="ties_groups"),
    # Medium, DeepSeek-V3-like: 64 experts in 8 groups, top-8 from 4 groups, > 1 parallel chunk.
    pytest.param(MEDIUM_T, 64, 8, "sigmoid", True, 8, 4, True, 2.5, "random", id="medium_deepseek"),
    # DeepSeek-V3's own router: 256 experts in 8 groups of 32, top-8 from 4 groups.
    pytest.param(150, 256, 8, "sigmoid", True, 8, 4, True, 2.5, "random", id="deepseek_v3_E256"),
    # Integer logits over 256 experts: ties inside and across the kept groups.
    pytest.param(60, 256, 8, "sigmoid", False, 8, 4, True, 2.5, "integer", id="ties_E256_groups"),
    # 256 experts without groups: the GPU kernel takes a token's experts in several slabs.
    pytest.param(90, 256, 8, "softmax", False, 1, 1, True, 1.0, "random", id="E256_ungrouped"),
    # Groups of 128 experts, more than one slab each: a group's two best merge across slabs.
    pytest.param(60, 256, 8, "sigmoid", True, 2, 1, True, 1.0, "random", id="groups_of_128"),
    # A bias of scale 3: many selection scores negative, whole groups below zero.
    pytest.param(60, 64, 6, "sigmoid", 3.0, 8, 3, True, 2.5, "random", id="negative_choices"),
    # 160 experts, top-6 (DeepSeek-V2's sizes): the last slab is partly past the end.
    pytest.param(90, 160, 6, "softmax", True, 1, 1, False, 1.0, "random", id="E160_K6"),
    # 384 experts (Kimi-K2's count): six slabs of 64, searched in a loop.
    pytest.param(50, 384, 4, "softmax", False, 1, 1, True, 1.0, "random", id="E384_K4"),
]
# The same columns, routed with group_score="max": a group scored by its best selection
# score alone (DeepSeek-V2's topk_method="group_limited_greedy").
GROUP_MAX_CASES = [
    # DeepSeek-V2's router: softmax, no bias, 2 of 4 groups, never normalized, scaled.
    pytest.param(64, 16, 3, "softmax", False, 4, 2, False, 1.5, "random", id="max_deepseek_v2"),
    # Softmax normalized, 1 of 2 groups.
    pytest.param(40, 8, 2, "softmax", False, 2, 1, True, 1.0, "random", id="max_softmax_norm"),
    # Sigmoid + bias (the group's best selection score includes its bias), scale 2.5.
    pytest.param(50, 16, 4, "sigmoid", True, 4, 2, True, 2.5, "random", id="max_sigmoid_bias"),
    # Softmax + bias, T = 1.
    pytest.param(1, 16, 4, "softmax", True, 4, 2, True, 1.0, "random", id="max_softmax_bias_T1"),
    # Groups of one expert: the best is the only one (the same as top2_sum).
    pytest.param(30, 4, 2, "sigmoid", True, 4, 2, True, 1.0, "random", id="max_group_size_1"),
    # K = all experts of the kept groups, prime T·K = 13·6 not a multiple of any block.
    pytest.param(13, 12, 6, "softmax", False, 3, 2, True, 1.0, "random", id="max_K_full"),
    # All-equal rows: every group ties, the lowest groups and experts win.
    pytest.param(20, 8, 3, "softmax", False, 4, 2, True, 1.0, "equal", id="max_ties_equal_rows"),
    # Integer logits: group maxima tie often, the lower group must win.
    pytest.param(40, 8, 3, "sigmoid", False, 4, 2, True, 1.0, "integer", id="max_ties_groups"),
    # Integer logits over 256 experts in 8 groups: ties inside and across kept groups.
    pytest.param(60, 256, 8, "sigmoid", False, 8, 4, True, 2.5, "integer", id="max_ties_E256"),
    # 64 experts in 8 groups, top-8 from 4, more than one parallel chunk.
    pytest.param(MEDIUM_T, 64, 8, "sigmoid", True, 8, 4, True, 2.5, "random", id="max_medium"),
    # DeepSeek-V2's sizes: 160 experts in 8 groups of 20, top-6 from 3 (a slab partly
    # past a group's end).
    pytest.param(90, 160, 6, "softmax", False, 8, 3, False, 16.0, "random",
                 id="max_deepseek_v2_E160"),
    # Groups of 128 experts: a group's best merges across the GPU kernel's slabs.
    pytest.param(60, 256, 8, "sigmoid", True, 2, 1, True, 1.0, "random", id="max_groups_of_128"),
    # A bias of scale 3: whole groups below zero.
    pytest.param(60, 64, 6, "sigmoid", 3.0, 8, 3, True, 2.5, "random", id="max_negative_choices"),
]
# Every case with its group_score (the last column).
ALL_CASES = ([pytest.param(*case.values, "top2_sum", id=case.id) for case in CASES]
             + [pytest.param(*case.values, "max", id=case.id) for case in GROUP_MAX_CASES])
CASE_COLUMNS = ("T, E, K, score, with_bias, n_groups, topk_groups, normalize, scale, pattern, "
                "group_score")


def _bias_scale(with_bias) -> float:
    """with_bias: True for a small bias (0.1 randn), or the bias's scale itself."""
    return 0.1 if with_bias is True else float(with_bias)


def make_logits(n_tokens, n_experts, pattern, dtype, device):
    if pattern == "equal":
        logits_TE = torch.full((n_tokens, n_experts), 0.3)
    elif pattern == "integer":
        logits_TE = torch.randint(-1, 2, (n_tokens, n_experts)).float()
    else:
        logits_TE = 2 * torch.randn(n_tokens, n_experts)
        if pattern == "one_expert":
            logits_TE[:, n_experts // 2] += 30
    return logits_TE.to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(CASE_COLUMNS, ALL_CASES)
def test_route_matches_reference(T, E, K, score, with_bias, n_groups, topk_groups, normalize,
                                 scale, pattern, group_score, dtype, device):
    logits_TE = make_logits(T, E, pattern, dtype, device)
    bias_E = _bias_scale(with_bias) * torch.randn(E, device=device) if with_bias else None
    kwargs = dict(top_k=K, score=score, n_groups=n_groups, topk_groups=topk_groups,
                  normalize=normalize, scale=scale, group_score=group_score)
    (weights_TK, experts_TK, counts_E), _ = check_op(
        lambda logits, bias: ops.route(logits, bias_E=bias, **kwargs),
        lambda logits, bias: reference.route(logits, bias_E=bias, **kwargs),
        [logits_TE, bias_E], differentiable=(0,))
    assert weights_TK.dtype == torch.float32 and experts_TK.dtype == counts_E.dtype == torch.int32
    assert weights_TK.shape == experts_TK.shape == (T, K) and counts_E.shape == (E,)
    assert counts_E.sum().item() == T * K
    assert ((experts_TK >= 0) & (experts_TK < E)).all()
    # Distinct experts per token.
    assert (experts_TK.sort(1).values.diff(dim=1) > 0).all()
    if normalize:
        sums_T = weights_TK.sum(1)
        assert torch.allclose(sums_T, torch.full_like(sums_T, scale), rtol=1e-5)
    if pattern == "equal":
        assert (experts_TK == torch.arange(K, dtype=torch.int32, device=device)).all()
    if pattern == "one_expert":
        assert (counts_E == torch.nn.functional.one_hot(torch.tensor(E // 2), E)
                .to(counts_E) * T).all()


def check_route_with_stats(logits_TE, bias_E, **kwargs):
    """ops.route_with_stats against the reference (ids, weights, counts, the loss sums
    and d(logits) from all three differentiable outputs); returns check_op's result."""
    def reference_with_stats(logits, bias):
        return (*reference.route(logits, bias_E=bias, **kwargs),
                *reference.route_stats(logits, kwargs["score"]))

    return check_op(lambda logits, bias: ops.route_with_stats(logits, bias_E=bias, **kwargs),
                    reference_with_stats, [logits_TE, bias_E], differentiable=(0,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(CASE_COLUMNS, ALL_CASES)
def test_route_with_stats_matches_reference(T, E, K, score, with_bias, n_groups, topk_groups,
                                            normalize, scale, pattern, group_score, dtype,
                                            device):
    """The balance-loss sums come from the routing pass itself: they, the weights and
    d(logits) from all three differentiable outputs together match the reference."""
    logits_TE = make_logits(T, E, pattern, dtype, device)
    bias_E = _bias_scale(with_bias) * torch.randn(E, device=device) if with_bias else None
    kwargs = dict(top_k=K, score=score, n_groups=n_groups, topk_groups=topk_groups,
                  normalize=normalize, scale=scale, group_score=group_score)
    (_, _, _, score_sum_E, lse_sq_sum), _ = check_route_with_stats(logits_TE, bias_E, **kwargs)
    assert score_sum_E.shape == (E,) and lse_sq_sum.shape == ()
    # Each token's normalized scores sum to 1.
    assert abs(score_sum_E.sum().item() - T) <= 1e-4 * T


@pytest.mark.parametrize("output", ["score_sum_E", "lse_sq_sum"])
def test_route_stats_gradient_alone(output):
    """A loss on one stats output alone (the others get no gradient) back-propagates
    exactly that term: the kernel must not assume d(weights) is present."""
    logits_TE = make_logits(40, 8, "random", torch.float32, "cpu")
    for score in ("softmax", "sigmoid"):
        got = torch.autograd.grad(
            (getattr(ops.route_with_stats(logits_TE.requires_grad_(), 2, score), output)
             * torch.linspace(0.5, 1.5, 8 if output == "score_sum_E" else 1).squeeze()).sum(),
            logits_TE)[0]
        score_sum_E, lse_sq_sum = reference.route_stats(logits_TE, score)
        ref = score_sum_E if output == "score_sum_E" else lse_sq_sum
        want = torch.autograd.grad(
            (ref * torch.linspace(0.5, 1.5, 8 if output == "score_sum_E" else 1).squeeze()).sum(),
            logits_TE)[0]
        assert_close(got, want, f"d(logits) from {output} ({score})")


def test_route_stats_thread_count_independent():
    """The sums are reduced in fixed chunks, in order: bitwise equal for 1 or 2 threads."""
    logits_TE = make_logits(1000, 16, "random", torch.float32, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.route_with_stats(logits_TE, 2)
        torch.set_num_threads(2)
        two = ops.route_with_stats(logits_TE, 2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.score_sum_E, two.score_sum_E)
    assert torch.equal(one.lse_sq_sum, two.lse_sq_sum)


def test_route_fp64_weights_stay_fp64():
    weights_TK, _, _ = ops.route(torch.randn(5, 6, dtype=torch.float64), 2)
    assert weights_TK.dtype == torch.float64


def test_bias_steers_selection_not_weights():
    """DeepSeek-V3: the bias picks experts; weights come from the unbiased scores."""
    logits_TE = torch.randn(32, 8)
    bias_E = torch.zeros(8)
    bias_E[5] = 10.0  # expert 5 always chosen
    weights_TK, experts_TK, counts_E = ops.route(logits_TE, 2, "sigmoid", bias_E, normalize=False)
    assert (experts_TK == 5).any(1).all() and counts_E[5] == 32
    assert_close(weights_TK, logits_TE.sigmoid().gather(1, experts_TK.long()), "weights")


def test_bias_gets_no_gradient():
    logits_TE = torch.randn(16, 8, requires_grad=True)
    bias_E = torch.randn(8, requires_grad=True)
    ops.route(logits_TE, 2, "sigmoid", bias_E).weights_TK.sum().backward()
    assert bias_E.grad is None and logits_TE.grad is not None


@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
def test_group_limited_selection_stays_in_kept_groups(group_score):
    T, E, G, kept = 64, 16, 4, 2
    _, experts_TK, _ = ops.route(torch.randn(T, E), 4, "sigmoid", n_groups=G, topk_groups=kept,
                                 group_score=group_score)
    groups_per_token = [len(set(row)) for row in (experts_TK // (E // G)).tolist()]
    assert max(groups_per_token) <= kept


# Logits of one token, 4 groups of 2 experts, and the experts each group_score keeps
# with topk_groups=1 and top_k=2 (the kept group's two experts), for softmax and sigmoid
# scores alike.
GROUP_SCORE_ROWS = [
    # Group 0's best expert beats every other, group 1's two together beat group 0's.
    ([1.5, -5.0, 1.0, 1.0, -3.0, -3.0, -3.0, -3.0], {"top2_sum": [2, 3], "max": [0, 1]}),
    # Groups 0 and 1 tie on their best (2.0): "max" keeps the lower one, group 0;
    # "top2_sum" keeps group 1 (2 + 0 > 2 - 1).
    ([-1.0, 2.0, 2.0, 0.0, -3.0, -3.0, -3.0, -3.0], {"top2_sum": [2, 3], "max": [1, 0]}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
@pytest.mark.parametrize("row, want", GROUP_SCORE_ROWS)
def test_group_score_decides_the_kept_group(row, want, group_score, score, device):
    """The kernels and the reference keep the group ``group_score`` says: rows where the
    two ways disagree (so a kernel scoring groups the other way fails), and a tie of
    group maxima, which goes to the lower group."""
    logits_TE = torch.tensor([row], device=device)
    for route in (ops.route, reference.route):
        _, experts_TK, _ = route(logits_TE, 2, score, None, 4, 1, True, 1.0,
                                 group_score=group_score)
        assert experts_TK.tolist() == [want[group_score]], route.__module__


def test_group_score_max_is_deepseek_v2_group_limited_greedy():
    """group_score="max", softmax, no renormalization, times the scale: the experts and
    weights of DeepSeek-V2's group_limited_greedy (transformers' DeepseekV2TopkRouter,
    written out here), which zeroes the other groups' scores where dsv3 excludes them:
    the same choice while the kept scores are > 0."""
    T, E, G, kept, K, scale = 200, 16, 4, 2, 3, 1.5
    logits_TE = 2 * torch.randn(T, E)
    scores_TE = logits_TE.softmax(-1)
    group_scores_TG = scores_TE.view(T, G, -1).max(-1).values
    group_mask_TG = torch.zeros_like(group_scores_TG).scatter_(
        1, group_scores_TG.topk(kept, -1).indices, 1)
    score_mask_TE = group_mask_TG[..., None].expand(-1, -1, E // G).reshape(T, E)
    want_w, want_e = scores_TE.masked_fill(~score_mask_TE.bool(), 0.0).topk(K, -1)
    weights_TK, experts_TK, _ = ops.route(logits_TE, K, "softmax", None, G, kept, False, scale,
                                          group_score="max")
    assert torch.equal(experts_TK.long(), want_e)  # topk's order: best first, as dsv3's
    assert_close(weights_TK, want_w * scale, "weights")


@pytest.mark.parametrize("op", [ops.route, ops.route_with_stats])
def test_logits_without_experts_are_named(op):
    """It said "n_groups must be in [1, 0], got 1", naming an argument the caller left
    at its default."""
    with pytest.raises(ValueError, match=r"route: logits_TE must have a column per expert.*"
                                         r"\(3, 0\)"):
        op(torch.zeros(3, 0), 1)


@pytest.mark.parametrize("group_score, error", [
    ("sum", ValueError),  # not one of the two
    ("Max", ValueError),  # names are exact
    (None, TypeError),
    (2, TypeError),
])
@pytest.mark.parametrize("op", [ops.route, ops.route_with_stats])
def test_bad_group_score_is_named(op, group_score, error):
    with pytest.raises(error, match=r"route: group_score must be .*'top2_sum', 'max'.*got"):
        op(torch.randn(4, 8), 2, n_groups=2, group_score=group_score)


def test_bad_group_score_reaching_the_kernels_is_named():
    """Below the Python checks, the op (C++) and the Triton launcher refuse it too."""
    with pytest.raises(ValueError, match=r"route: group_score must be 'top2_sum' or 'max', "
                                         r"got 'sum'"):
        torch.ops.dsv3.route(torch.randn(4, 8), 2, "softmax", None, 2, 1, True, 1.0, False,
                             "sum")
    router = pytest.importorskip("dsv3.kernels.router")
    with pytest.raises(ValueError, match=r"route: group_score must be 'top2_sum' or 'max'"):
        router.route(torch.randn(4, 8), 2, "softmax", None, 2, 1, True, 1.0, False, "sum")


def test_the_op_without_group_score_keeps_its_old_signature():
    """Callers of dsv3::route from before group_score (nine arguments) get top2_sum,
    gradient included."""
    logits_TE = torch.randn(30, 8, requires_grad=True)
    old = torch.ops.dsv3.route(logits_TE, 3, "sigmoid", None, 4, 2, True, 2.5, False)
    new = torch.ops.dsv3.route(logits_TE, 3, "sigmoid", None, 4, 2, True, 2.5, False, "top2_sum")
    assert torch.equal(old[1], new[1]) and torch.equal(old[0], new[0])
    (grad,) = torch.autograd.grad(old[0].sum(), logits_TE)
    (want,) = torch.autograd.grad(new[0].sum(), logits_TE)
    assert torch.equal(grad, want)


def test_non_contiguous_logits():
    logits_TE = torch.randn(8, 20)[:, ::2]  # stride 2
    for got, want in zip(ops.route(logits_TE, 3), reference.route(logits_TE, 3)):
        assert_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("E, score, with_bias, n_groups", [
    (8, "softmax", False, 1),  # E a power of two
    (8, "sigmoid", True, 2),  # the bias path reloads the chosen logits
    (160, "softmax", True, 1),  # E not a power of two: masked expert columns
    (24, "sigmoid", True, 3),  # 3 groups: the padding group past them must not be read
])
def test_triton_router_keeps_a_nan_rows_copies_in_bounds(E, score, with_bias, n_groups, device,
                                                         monkeypatch):
    """A NaN or +inf row makes the op raise, on a GPU through an asynchronous device
    assert, after the kernel ran: what the kernel stored and counted for that row must
    stay inside experts_TK's range and counts_E. (Its selection matched no score and
    left the id at E, one past the last counter.) Its reads too: with groups not a power
    of two, a NaN row's group pick could name a padding group, whose columns lie past the
    row's end (a fault on a GPU for the last row; the interpreter reads on)."""
    router = pytest.importorskip("dsv3.kernels.router")  # triton is optional
    from dsv3.kernels import config
    if device == "cpu" and not config.INTERPRET:
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    monkeypatch.setattr(router, "_raise_on_nan", lambda nan_flag: None)  # look past the error
    T, K = 20, 4
    logits_TE = torch.randn(T, E)
    logits_TE[3] = float("nan")
    logits_TE[T - 1] = float("nan")  # the last row: a read past its end leaves the tensor
    logits_TE[11, 2] = float("inf")
    bias_E = torch.randn(E) if with_bias else None
    args = [t.to(device) if t is not None else None for t in (logits_TE, bias_E)]
    _, experts_TK, counts_E, _, _ = router.route(args[0], K, score, args[1], n_groups,
                                                 1, True, 1.0, False)
    assert ((experts_TK >= 0) & (experts_TK < E)).all(), experts_TK[[3, 11]]
    assert counts_E.sum().item() == T * K  # every copy counted, none past the end
    assert torch.equal(counts_E.cpu(), torch.bincount(experts_TK.flatten().long().cpu(),
                                                       minlength=E).to(torch.int32))


@pytest.mark.parametrize("stats", [False, True])
@pytest.mark.parametrize("score, bias", [("softmax", False), ("sigmoid", True)])
def test_group_max_op_registration(score, bias, stats):
    """torch.library.opcheck of dsv3::route with group_score="max" (the other calls are in
    test_opcheck.py): schema, fake impl, autograd registration and AOT dispatch."""
    logits_TE = torch.randn(9, 8, requires_grad=True)
    bias_E = torch.randn(8) if bias else None
    torch.library.opcheck(torch.ops.dsv3.route.default,
                          (logits_TE, 3, score, bias_E, 4, 2, False, 1.5, stats, "max"))


# Cases whose tiles differ in shape: slots masked past K (K=3, 6), experts masked past E
# (E=7, 160), groups, a bias, 256 experts in several slabs, one-hot and atomic counts.
TILE_ORDER_CASES = ["mixtral", "primeE7_TK39", "softmax_bias", "deepseek_groups", "E160_K6",
                    "E256_ungrouped", "max_sigmoid_bias"]


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="runs the Triton router under the "
                    "interpreter pass, where the kernel's layout choice can be switched")
@pytest.mark.parametrize("one_hot_counts", [0, 64], ids=["per_copy_counts", "one_hot_counts"])
@pytest.mark.parametrize("tokens_outer", [False, True])
@pytest.mark.parametrize(CASE_COLUMNS, [case for case in ALL_CASES if case.id in TILE_ORDER_CASES])
def test_route_same_in_either_tile_order(T, E, K, score, with_bias, n_groups, topk_groups,
                                         normalize, scale, pattern, group_score, tokens_outer,
                                         one_hot_counts, monkeypatch):
    """The router loads and stores its tiles token-major under Triton 3.6 and as
    [rows, T, ...] from 3.7 on (router._TOKENS_OUTER: a layout choice, no other change).
    Both orders, whichever Triton is installed, and both ways of counting copies per
    expert (one atomic per copy; per-program one-hot sums, up to 64 slots x bins):
    forward with the loss sums, and the backward with all three gradients, against the
    reference."""
    import triton.language as tl

    from dsv3.kernels import router
    monkeypatch.setattr(router, "_TOKENS_OUTER", tl.constexpr(tokens_outer))
    monkeypatch.setattr(router, "_ONE_HOT_COUNTS", one_hot_counts)
    logits_TE = make_logits(T, E, pattern, torch.float32, "cpu")
    bias_E = _bias_scale(with_bias) * torch.randn(E) if with_bias else None
    kwargs = dict(top_k=K, score=score, n_groups=n_groups, topk_groups=topk_groups,
                  normalize=normalize, scale=scale, group_score=group_score)
    check_route_with_stats(logits_TE, bias_E, **kwargs)


# Cases over one slab and several, groups or none, ties, slabs padded past a group's or
# the row's end (groups of 20 in slabs of 32; E=160), groups inside a vector (groups of
# 2: rounds either way), K below a power of two (3, 6).
SELECTION_CASES = ["mixtral", "softmax_bias", "deepseek_groups", "ties_groups",
                   "ties_equal_rows", "ties_E256_groups", "E160_K6", "negative_choices",
                   "groups_of_128", "max_ties_groups", "max_deepseek_v2_E160"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("network", [False, True], ids=["rounds", "network"])
@pytest.mark.parametrize(CASE_COLUMNS, [case for case in ALL_CASES if case.id in SELECTION_CASES])
def test_route_same_by_rounds_or_network(T, E, K, score, with_bias, n_groups, topk_groups,
                                         normalize, scale, pattern, group_score, network,
                                         device, monkeypatch):
    """The router takes its top-k in rounds or by a bitonic network over packed keys
    (router._network picks per shape): each way, wherever the network fits (a slab of at
    least the next power of two of K, groups on whole vectors), the same ids, weights
    and counts as the reference, ties to the lower id. On a GPU the network's
    compare-exchange is inline PTX, which the interpreter never runs."""
    if device == "cpu" and not TRITON_INTERPRETED:
        pytest.skip("runs the Triton router on CPU tensors under the interpreter pass")
    from dsv3.kernels import router
    monkeypatch.setattr(router, "_network", lambda block_k, slab, merges: network
                        and block_k <= slab)
    logits_TE = make_logits(T, E, pattern, torch.float32, device)
    bias_E = (_bias_scale(with_bias) * torch.randn(E, device=device) if with_bias
              else None)
    kwargs = dict(top_k=K, score=score, n_groups=n_groups, topk_groups=topk_groups,
                  normalize=normalize, scale=scale, group_score=group_score)
    check_op(lambda logits, bias: ops.route(logits, bias_E=bias, **kwargs),
             lambda logits, bias: reference.route(logits, bias_E=bias, **kwargs),
             [logits_TE, bias_E], differentiable=(0,))


def test_network_is_picked_where_it_saves_instructions():
    """router._network's rule on the routers its sm_90 counts were taken for."""
    router = pytest.importorskip("dsv3.kernels.router")

    def network(E, K, n_groups=1, topk_groups=1, dtype=torch.float32):
        return router._blocks(torch.empty(1, E, dtype=dtype), K, n_groups, topk_groups)["NETWORK"]

    assert network(256, 8, 8, 4) and network(256, 8, 8, 4, torch.bfloat16)  # DeepSeek-V3
    assert network(128, 8)  # Qwen3-MoE: two slabs of 64
    assert not network(8, 2)  # Mixtral: top-2
    assert not network(40, 8) and not network(64, 6)  # one slab: rounds are cheaper
    assert not network(12, 6, 3, 2)  # groups of 4 in a slab of 4: too small for 8 slots
    assert not network(72, 6, 8, 3)  # groups of 9 start inside 16-byte vectors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("score, with_bias, n_groups, topk_groups", [
    ("softmax", False, 1, 1), ("softmax", False, 4, 2), ("softmax", True, 1, 1),
    ("softmax", True, 4, 2), ("sigmoid", False, 1, 1), ("sigmoid", True, 4, 2)])
def test_a_row_of_minus_inf_logits_routes_as_the_reference(score, with_bias, n_groups,
                                                          topk_groups, device):
    """A row whose logits are all -inf (masked out whole): its softmax is NaN in torch,
    the reference and every kernel (weights and the row's share of the score sums), its
    sigmoid scores 0 (normalized weights 0, score sums 0 / 0); its experts the first K,
    as equal scores go, with a selection bias too on softmax scores (NaN plus the bias).
    The Triton router once gave softmax weights 0, sums without the NaN, and experts
    chosen by the bias."""
    T, E, K = 21, 16, 3
    logits_TE = torch.randn(T, E, device=device)
    logits_TE[[1, T - 1]] = float("-inf")
    bias_E = torch.randn(E, device=device) if with_bias else None
    kwargs = dict(top_k=K, score=score, bias_E=bias_E, n_groups=n_groups,
                  topk_groups=topk_groups)
    got = ops.route_with_stats(logits_TE, **kwargs)
    want = (*reference.route(logits_TE, **kwargs), *reference.route_stats(logits_TE, score))
    for name, g, w in zip(("weights", "experts", "counts", "score sums", "lse^2"), got, want):
        if g.is_floating_point():
            torch.testing.assert_close(g, w.to(g.dtype), equal_nan=True, msg=name)
        else:
            assert torch.equal(g.cpu(), w.cpu()), name
    assert got[0][1].isnan().all() == (score == "softmax")


@pytest.mark.parametrize("device", DEVICES)
def test_sigmoid_scores_that_all_underflow_make_nan_score_sums_as_the_reference(device):
    """Logits of -200 have sigmoid scores of 0 in fp32: the row's normalized scores are
    0 / 0, NaN in the reference and the C++ kernel; the Triton router added 0."""
    logits_TE = torch.randn(21, 16, device=device)
    logits_TE[4] = -200.0
    got, _ = ops.route_with_stats(logits_TE, 3, "sigmoid")[3:]
    want, _ = reference.route_stats(logits_TE, "sigmoid")
    assert got.isnan().all()
    torch.testing.assert_close(got, want.to(got.dtype), equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("score, normalize, output", [
    ("softmax", False, "weights"), ("softmax", True, "weights"), ("sigmoid", False, "score sums")])
def test_the_gradient_of_a_row_without_scores_is_nan_as_the_reference(score, normalize, output,
                                                                      device):
    """A softmax row of -inf logits has NaN weights and a sigmoid row whose scores all
    underflow NaN score sums (0 / 0): their gradients are NaN too, in the reference and
    the C++ kernel. The Triton router's backward divided by 1 instead and gave zeros (or,
    for the sums, finite values), a NaN forward with a clean-looking gradient."""
    logits_TE = torch.randn(21, 16, device=device)
    logits_TE[4] = float("-inf") if score == "softmax" else -200.0
    grads = []
    for route, stats in ((ops.route_with_stats, lambda l: ()),
                         (reference.route, lambda l: reference.route_stats(l, score))):
        leaf = logits_TE.clone().requires_grad_()
        weights_TK, _, _, *sums = (*route(leaf, 3, score, normalize=normalize), *stats(leaf))
        loss = weights_TK.sum() if output == "weights" else sums[0].sum()
        grads.append(torch.autograd.grad(loss, leaf)[0])
    got, want = grads
    assert got[4].isnan().all()
    assert not got[torch.arange(21) != 4].isnan().any()
    torch.testing.assert_close(got, want.to(got.dtype), equal_nan=True)


# Cases whose counts are summed per program (slots x bins up to 16): top-2 of 8, one
# token, top-1 (every token to one expert), unnormalized, sigmoid, groups of 4 experts,
# and groups scored by their best.
WIDE_CASES = ["mixtral", "T1", "one_expert", "softmax_raw_scale", "sigmoid", "group_size_1",
              "max_softmax_norm"]
# Mixtral's router over several four-token programs, the last one partial (the
# interpreter's programs take 64 tokens, a GPU's 512), with a bias.
SEVERAL_WIDE_PROGRAMS = pytest.param(130 if TRITON_INTERPRETED else 1100, 8, 2, "softmax", True,
                                     1, 1, True, 1.0, "random", "top2_sum",
                                     id="mixtral_several_programs")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wide", [False, True], ids=["token_a_thread", "four_tokens_a_thread"])
@pytest.mark.parametrize(CASE_COLUMNS, [case for case in ALL_CASES if case.id in WIDE_CASES]
                         + [SEVERAL_WIDE_PROGRAMS])
def test_route_same_with_four_tokens_a_thread(T, E, K, score, with_bias, n_groups, topk_groups,
                                              normalize, scale, pattern, group_score, wide,
                                              dtype, device, monkeypatch):
    """Where the counts are summed per program, the forward gives each thread four tokens
    once the tokens fill enough programs (router._widened): ids, weights, counts, the
    loss sums and the backward as the reference's either way, and a NaN row still
    raises."""
    if device == "cpu" and not TRITON_INTERPRETED:
        pytest.skip("runs the Triton router on CPU tensors under the interpreter pass")
    from dsv3.kernels import router
    monkeypatch.setattr(router, "_WIDE_MIN_PROGRAMS", 0 if wide else 1 << 40)
    logits_TE = make_logits(T, E, pattern, dtype, device)
    blocks = router._widened(router._blocks(logits_TE, K, n_groups, topk_groups), T)
    assert blocks["BLOCK_T"] == router._TOKENS_PER_PROGRAM * (4 if wide else 1)
    bias_E = (_bias_scale(with_bias) * torch.randn(E, device=device) if with_bias
              else None)
    kwargs = dict(top_k=K, score=score, n_groups=n_groups, topk_groups=topk_groups,
                  normalize=normalize, scale=scale, group_score=group_score)
    check_route_with_stats(logits_TE, bias_E, **kwargs)
    logits_TE[T // 2, E // 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ops.route(logits_TE, bias_E=bias_E, **kwargs)
