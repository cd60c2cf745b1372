"""dsv3.MoE against reference.moe (a loop over experts): output and the gradients of
x, the router and every expert weight, over the layer's configurations; plus the
layer's own contracts: per-expert gradient isolation, capacity drops and their
count, [B, S, D] input and bitwise determinism. (Its balance losses and bias updates:
test_moe_balance.py.)"""
import math

import pytest
import torch
from torch.func import functional_call

import dsv3
from conftest import DEVICES, DTYPES, TRITON_INTERPRETED, assert_close, check_op
from dsv3 import MoE, MoEConfig, ops, reference


def make_moe(dtype=torch.float32, **overrides) -> MoE:
    config = MoEConfig(**{"dim": 32, "ffn_dim": 48, "n_experts": 8, "top_k": 2, **overrides})
    return MoE(config, dtype=dtype)


def capacity_of(moe: MoE, n_tokens: int) -> int | None:
    c = moe.config
    if c.capacity_factor is None:
        return None
    return math.ceil(c.capacity_factor * n_tokens * c.top_k / c.n_experts)


def param_names(moe: MoE) -> list[str]:
    return [name for name, _ in moe.named_parameters()]


def run_moe(moe: MoE, x, *params):
    return functional_call(moe, dict(zip(param_names(moe), params)), (x,))


def run_reference(moe: MoE, x, *params):
    """reference.moe with the module's config, on the given parameter tensors."""
    c, p = moe.config, dict(zip(param_names(moe), params))
    shared = None
    if moe.shared_experts is not None:
        def shared(x_TD):  # the shared experts are one dense SwiGLU MLP
            return reference.expert_ffn(x_TD, p["shared_experts.gate_up_proj.weight"],
                                        p["shared_experts.down_proj.weight"], c.swiglu_limit)
    x_TD = x.reshape(-1, c.dim)
    y_TD, _, _ = reference.moe(
        x_TD, p["router.weight"], p["gate_up_proj"], p["down_proj"], top_k=c.top_k,
        score=c.score, bias_E=moe.expert_bias, n_groups=c.n_groups, topk_groups=c.topk_groups,
        normalize=c.normalize_weights, scale=c.route_scale,
        capacity=capacity_of(moe, x_TD.shape[0]), shared=shared, swiglu_limit=c.swiglu_limit,
        group_score=c.group_score)
    return y_TD.view(x.shape)


def reference_experts(moe: MoE, x_TD) -> torch.Tensor:
    c = moe.config
    _, _, experts_TK = reference.moe(
        x_TD.float(), moe.router.weight.float(), moe.gate_up_proj.float(), moe.down_proj.float(),
        top_k=c.top_k, score=c.score, bias_E=moe.expert_bias, n_groups=c.n_groups,
        topk_groups=c.topk_groups, normalize=c.normalize_weights, scale=c.route_scale,
        group_score=c.group_score)
    return experts_TK


def make_input(moe: MoE, shape, dtype, hot_expert=None):
    """Random tokens; with ``hot_expert``, the router is set so that every token's
    first choice is that expert (a constant feature it alone weighs heavily)."""
    x = torch.randn(*shape, moe.config.dim, device=moe.router.weight.device)
    if hot_expert is not None:
        x[..., 0] = 5.0
        with torch.no_grad():
            moe.router.weight[:, 0] = 0.0
            moe.router.weight[hot_expert, 0] = 10.0
    return x.to(dtype)


# (token shape, config overrides, hot expert or None)
CASES = [
    # Mixtral-style baseline: softmax top-2 of 8.
    pytest.param((64,), {}, None, id="baseline"),
    # T = 1: a single token.
    pytest.param((1,), {}, None, id="T1"),
    # K = E: every expert computes every token.
    pytest.param((16,), {"n_experts": 4, "top_k": 4}, None, id="K_eq_E"),
    # Odd dims: D = 100, F = 37.
    pytest.param((20,), {"dim": 100, "ffn_dim": 37}, None, id="odd_dims_D100_F37"),
    # Prime E = 7 and T·K = 39, not a multiple of any block.
    pytest.param((13,), {"n_experts": 7, "top_k": 3}, None, id="primeE7_TK39"),
    # Prime E = 13.
    pytest.param((30,), {"n_experts": 13, "top_k": 2}, None, id="primeE13"),
    # All tokens to one expert (K = 1): the other seven experts are empty.
    pytest.param((24,), {"top_k": 1}, 3, id="one_expert"),
    # Empty experts: 3 tokens x top-2 reach at most 6 of 16 experts.
    pytest.param((3,), {"n_experts": 16}, None, id="empty_experts"),
    # Sigmoid scores, unnormalized, scale != 1.
    pytest.param((32,), {"score": "sigmoid", "normalize_weights": False, "route_scale": 0.7},
                 None, id="sigmoid_raw_scale"),
    # DeepSeek-V3: sigmoid + selection bias + 4 groups (2 kept) + scale 2.5 + a shared expert.
    pytest.param((40,), {"n_experts": 16, "top_k": 4, "score": "sigmoid", "n_groups": 4,
                         "topk_groups": 2, "route_scale": 2.5, "bias_update_rate": 1e-3,
                         "n_shared_experts": 1}, None, id="deepseek"),
    # DeepSeek-V2's group_limited_greedy: softmax, groups scored by their best expert
    # (group_score="max"), 2 of 4 kept, never renormalized, scale 1.5, 2 shared experts.
    pytest.param((40,), {"n_experts": 16, "top_k": 3, "n_groups": 4, "topk_groups": 2,
                         "group_score": "max", "normalize_weights": False, "route_scale": 1.5,
                         "n_shared_experts": 2}, None, id="deepseek_v2_group_max"),
    # Groups scored by their best expert with sigmoid and the selection bias.
    pytest.param((40,), {"n_experts": 16, "top_k": 4, "score": "sigmoid", "n_groups": 4,
                         "topk_groups": 2, "group_score": "max", "route_scale": 2.5,
                         "bias_update_rate": 1e-3}, None, id="sigmoid_bias_group_max"),
    # Capacity 0.5: half of the copies are dropped (later tokens first).
    pytest.param((48,), {"capacity_factor": 0.5}, None, id="capacity_drops"),
    # Capacity with every token on one expert: most of the hot expert's copies drop.
    pytest.param((24,), {"capacity_factor": 1.0}, 5, id="capacity_one_expert"),
    # [B, S, D] input: y has x's shape.
    pytest.param((3, 7), {}, None, id="BSD_input"),
    # Clamped SwiGLU (GLM-5-Next, DeepSeek-V4) in the routed and the shared experts: with
    # these weights |gate|, |up| ~ 0.58 (std), so a limit of 0.5 clamps about 40% of them.
    pytest.param((40,), {"n_experts": 16, "top_k": 4, "score": "sigmoid", "n_groups": 4,
                         "topk_groups": 2, "route_scale": 2.5, "n_shared_experts": 2,
                         "swiglu_limit": 0.5}, None, id="clamped_swiglu"),
    # Medium: 512 tokens, 16 experts, top-4 (128 rows an expert on average). Under the
    # interpreter, where this case took a minute a dtype, 256 tokens: 64 rows an expert
    # still span two or three of its 32-row tiles.
    pytest.param((256 if TRITON_INTERPRETED else 512,),
                 {"dim": 64, "ffn_dim": 96, "n_experts": 16, "top_k": 4}, None, id="medium"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, overrides, hot_expert", CASES)
def test_moe_matches_reference(shape, overrides, hot_expert, dtype, device):
    moe = make_moe(dtype, **overrides).to(device)
    if moe.expert_bias is not None:
        moe.expert_bias.copy_(0.05 * torch.randn_like(moe.expert_bias))
    x = make_input(moe, shape, dtype, hot_expert)
    params = [p.detach() for p in moe.parameters()]
    (y,), _ = check_op(lambda *a: run_moe(moe, *a), lambda *a: run_reference(moe, *a),
                       [x, *params], differentiable=tuple(range(len(params) + 1)))
    assert y.shape == x.shape and y.dtype == dtype

    # The stats of that forward count what the reference routed (after capacity).
    experts_TK = reference_experts(moe, x.reshape(-1, moe.config.dim))
    counts_E = torch.bincount(experts_TK.flatten(), minlength=moe.config.n_experts)
    capacity = capacity_of(moe, experts_TK.shape[0])
    kept_E = counts_E if capacity is None else counts_E.clamp(max=capacity)
    stats = moe.last_stats
    assert torch.equal(stats.tokens_per_expert.long(), kept_E)
    assert stats.dropped_tokens.item() == (counts_E - kept_E).sum().item()
    if hot_expert is not None:
        assert experts_TK[:, 0].eq(hot_expert).all()


def test_each_expert_gets_gradient_only_from_its_own_tokens():
    moe = make_moe()
    x_TD = torch.randn(40, 32)
    experts_TK = reference_experts(moe, x_TD)
    counts_E = torch.bincount(experts_TK.flatten(), minlength=8)
    e = counts_E.argmax().item()
    mine_T = (experts_TK == e).any(1)
    assert 0 < mine_T.sum() < 40

    # Upstream gradient only on the other tokens: expert e's weights get exactly zero.
    grad_TD = torch.randn(40, 32) * ~mine_T[:, None]
    moe(x_TD).backward(grad_TD)
    assert (moe.gate_up_proj.grad[e] == 0).all() and (moe.down_proj.grad[e] == 0).all()
    others = torch.arange(8) != e
    assert moe.gate_up_proj.grad[others & (counts_E > 0)].abs().sum(dim=(1, 2)).gt(0).all()

    # Upstream gradient only on expert e's tokens: its gradient is that of the
    # reference loop on those tokens alone.
    moe.zero_grad()
    grad_TD = torch.randn(40, 32) * mine_T[:, None]
    moe(x_TD).backward(grad_TD)
    want = [p.detach().clone().requires_grad_() for p in (moe.gate_up_proj, moe.down_proj)]
    y_TD, _, _ = reference.moe(x_TD, moe.router.weight.detach(), *want, top_k=2)
    y_TD.backward(grad_TD)
    assert_close(moe.gate_up_proj.grad[e], want[0].grad[e], "gate_up_proj grad")
    assert_close(moe.down_proj.grad[e], want[1].grad[e], "down_proj grad")


def test_empty_experts_get_exact_zero_gradient():
    moe = make_moe(n_experts=16)
    x_TD = torch.randn(3, 32)
    counts_E = torch.bincount(reference_experts(moe, x_TD).flatten(), minlength=16)
    moe(x_TD).sum().backward()
    empty_E = counts_E == 0
    assert empty_E.sum() >= 10
    assert (moe.gate_up_proj.grad[empty_E] == 0).all() and (moe.down_proj.grad[empty_E] == 0).all()


@pytest.mark.parametrize("capacity_factor", [
    0.25,  # most copies dropped
    1.0,  # balanced capacity: drops only where routing is uneven
    8.0,  # capacity above any expert's load: nothing dropped
])
def test_capacity_drops_overflow_and_counts_it(capacity_factor):
    moe = make_moe(capacity_factor=capacity_factor)
    x_TD = torch.randn(64, 32)
    y_TD = moe(x_TD)
    capacity = math.ceil(capacity_factor * 64 * 2 / 8)
    counts_E = torch.bincount(reference_experts(moe, x_TD).flatten(), minlength=8)
    stats = moe.last_stats
    assert stats.dropped_tokens.dtype == torch.int64
    assert stats.dropped_tokens.item() == (counts_E - capacity).clamp(min=0).sum().item()
    assert (stats.tokens_per_expert <= capacity).all()
    assert stats.tokens_per_expert.sum().item() + stats.dropped_tokens.item() == 64 * 2
    if capacity_factor == 8.0:
        assert stats.dropped_tokens.item() == 0
        dropless = make_moe()
        dropless.load_state_dict(moe.state_dict())
        assert_close(y_TD, dropless(x_TD))


def test_token_with_every_copy_dropped_outputs_zero():
    moe = make_moe(top_k=1, capacity_factor=1.0)
    x = make_input(moe, (16,), torch.float32, hot_expert=2)  # all 16 tokens want expert 2
    y_TD = moe(x)
    capacity = math.ceil(16 / 8)
    assert moe.last_stats.dropped_tokens.item() == 16 - capacity
    assert (y_TD[capacity:] == 0).all() and (y_TD[:capacity] != 0).any(1).all()


@pytest.mark.parametrize("shape", [
    (2, 5),  # [B, S, D]
    (2, 3, 4),  # any leading dims
])
def test_leading_dims(shape):
    moe = make_moe()
    x = torch.randn(*shape, 32)
    y = moe(x)
    assert y.shape == x.shape
    assert_close(y.reshape(-1, 32), moe(x.reshape(-1, 32)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("overrides", [
    pytest.param({}, id="softmax"),
    pytest.param({"capacity_factor": 1.25}, id="capacity"),
    pytest.param({"n_shared_experts": 1, "score": "sigmoid", "n_groups": 4, "topk_groups": 2,
                  "bias_update_rate": 1e-3, "aux_loss_coef": 0.01, "z_loss_coef": 1e-3},
                 id="deepseek_v3_like"),
])
@pytest.mark.parametrize("shape", [(0,), (2, 0)])
def test_empty_batch_gives_empty_output_and_zero_gradients(shape, overrides, device):
    # As nn.Linear and the transformers blocks patch_moe replaces: no tokens is an empty
    # output (not an error), zero balance losses, zero counts, and a backward that
    # still reaches x and every parameter (the experts' weights were left out of the
    # graph, which DDP takes for unused parameters on the rank with the empty batch).
    moe = make_moe(**overrides).to(device)
    moe.collect_router_entropy = True
    x = torch.randn(*shape, 32, device=device, requires_grad=True)
    y = moe(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    (y.sum() + dsv3.moe_aux_loss(moe)).backward()
    assert x.grad.shape == x.shape
    for name, parameter in moe.named_parameters():
        assert parameter.grad is not None and (parameter.grad == 0).all(), name
    stats = moe.last_stats
    assert stats.tokens_per_expert.tolist() == [0] * 8 and stats.dropped_tokens.item() == 0
    assert stats.aux_loss.item() == 0 and stats.z_loss.item() == 0
    assert moe.aux_loss.item() == 0 and stats.router_entropy is None
    if moe.expert_bias is not None:  # no counts: the balancing step leaves the bias
        moe.update_bias()
        assert (moe.expert_bias == 0).all()
    with torch.autocast(x.device.type, dtype=torch.float16):
        y = moe(x.detach())
        assert y.shape == x.shape and y.dtype == torch.float16  # as a token-holding batch's
    # a low-precision layer's output stays in its dtype (the router's weights are fp32)
    half = moe.to(torch.float16)
    assert half(x.detach().half()).dtype == torch.float16


@pytest.mark.parametrize("device", DEVICES)
def test_moe_is_bitwise_deterministic(device):
    """No float atomics anywhere in the layer: two runs give the same bits (GPU too)."""
    moe = make_moe(n_shared_experts=1, dtype=torch.bfloat16).to(device)
    x = torch.randn(100, 32, dtype=torch.bfloat16, device=device)
    grad = torch.randn(100, 32, dtype=torch.bfloat16, device=device)

    def run():
        moe.zero_grad()
        y = moe(x)
        y.backward(grad)
        return [y.detach()] + [p.grad.clone() for p in moe.parameters()]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32])
def test_autocast_runs_experts_in_low_precision_from_fp32_weights(dtype):
    """Under autocast the experts compute in its dtype from the fp32 master weights
    (gradients land in fp32), the router stays fp32, and the result tracks fp32."""
    moe = make_moe(n_shared_experts=1)
    x_TD = torch.randn(40, 32)
    want = moe(x_TD)
    with torch.autocast("cpu", dtype):
        got = moe(x_TD)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05 * want.abs().max().item())
    got.float().sum().backward()
    assert moe.gate_up_proj.grad.dtype == torch.float32
    assert torch.isfinite(moe.gate_up_proj.grad).all() and moe.router.weight.grad.abs().sum() > 0


def test_router_entropy_is_collected_on_request():
    moe = make_moe()
    moe(torch.randn(10, 32))
    assert moe.last_stats.router_entropy is None
    moe.collect_router_entropy = True
    moe(torch.randn(10, 32))
    entropy = moe.last_stats.router_entropy.item()
    assert 0 < entropy <= math.log(8) + 1e-6


def test_swiglu_limit_clamps_routed_and_shared_experts():
    """The clamp of the test case above is active: the same weights without it compute
    another function, in the routed experts and in the shared ones alike."""
    clamped = make_moe(n_shared_experts=1, swiglu_limit=0.5)
    plain = make_moe(n_shared_experts=1)
    plain.load_state_dict(clamped.state_dict())
    assert clamped.shared_experts.swiglu_limit == 0.5
    x = torch.randn(40, 32)
    h_T2F = clamped.shared_experts.gate_up_proj(x)
    assert (h_T2F.abs() > 0.5).float().mean() > 0.2, "the limit clamps too little to be tested"
    assert not torch.allclose(clamped(x), plain(x))
    assert not torch.allclose(clamped.shared_experts(x), plain.shared_experts(x))
    assert_close(clamped(x), run_reference(clamped, x, *[p.detach() for p in clamped.parameters()]))


@pytest.mark.parametrize("limit, error, message", [
    (0.0, ValueError, "must be > 0"), (-1.0, ValueError, "must be > 0"),
    (math.inf, ValueError, "must be finite"), (math.nan, ValueError, "must be finite"),
    ("10", TypeError, "must be a number"), (True, TypeError, "must be a number")])
def test_swiglu_limit_is_validated(limit, error, message):
    with pytest.raises(error, match=f"MoEConfig: swiglu_limit {message}"):
        make_moe(swiglu_limit=limit)


@pytest.mark.parametrize("group_score, error", [
    ("sum", ValueError), ("MAX", ValueError), (None, TypeError), (1, TypeError)])
def test_group_score_is_validated(group_score, error):
    with pytest.raises(error, match=r"MoEConfig: group_score must be .*\('top2_sum', "
                                    r"'max'\), got"):
        make_moe(n_experts=8, n_groups=4, topk_groups=2, group_score=group_score)


def test_group_score_reaches_the_router():
    """A layer with group_score="max" routes by it: the copies it counts per expert are
    the reference's with "max", and not those of the same weights with "top2_sum"."""
    overrides = dict(n_experts=16, top_k=2, n_groups=8, topk_groups=2)
    top2, best = make_moe(**overrides), make_moe(**overrides, group_score="max")
    best.load_state_dict(top2.state_dict())
    x_TD = torch.randn(200, 32)
    counts = {}
    for moe in (top2, best):
        want = reference_experts(moe, x_TD)
        moe(x_TD)
        counts[moe.config.group_score] = moe.last_stats.tokens_per_expert
        assert torch.equal(counts[moe.config.group_score].long(),
                           torch.bincount(want.flatten(), minlength=16))
    assert not torch.equal(counts["top2_sum"], counts["max"])


def test_shared_experts_pickled_before_swiglu_limit_still_run():
    # A SwiGLUMLP saved whole (torch.save(model)) before swiglu_limit existed has no
    # such attribute; before: AttributeError on its first forward.
    import io

    from dsv3.moe import SwiGLUMLP
    mlp = SwiGLUMLP(8, 12)
    del mlp.swiglu_limit  # what an old pickle restores
    buffer = io.BytesIO()
    torch.save(mlp, buffer)
    buffer.seek(0)
    old = torch.load(buffer, weights_only=False)
    x = torch.randn(3, 8)
    torch.testing.assert_close(old(x), mlp.down_proj(ops.swiglu(mlp.gate_up_proj(x))))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_float64_layer_passes_gradcheck_with_its_balance_losses(score):
    """A float64 layer routes in float64: before, the router's logits were fp32 and
    gradcheck failed for x and the router weight. Output and losses, w.r.t. x and every
    weight (routed, shared, router), training with both balance losses on."""
    moe = make_moe(torch.float64, dim=4, ffn_dim=6, n_experts=4, top_k=2, score=score,
                   n_shared_experts=1, aux_loss_coef=0.1, z_loss_coef=0.01).train()
    x_TD = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in moe.parameters()]

    def output_and_losses(x_TD, *params):
        y_TD = run_moe(moe, x_TD, *params)
        return y_TD, moe.aux_loss

    assert torch.autograd.gradcheck(output_and_losses, (x_TD, *params))
    assert moe.aux_loss.dtype == moe.last_stats.z_loss.dtype == torch.float64


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_float64_layer_matches_the_float64_reference(score):
    """The reference routes fp64 inputs in fp64, as the layer does: before, its logits were
    fp32 and the two differed by ~1e-8, which a float64 comparison cannot accept."""
    moe = make_moe(torch.float64, score=score, n_shared_experts=1)
    x_TD = torch.randn(40, 32, dtype=torch.float64)
    params = [p.detach() for p in moe.parameters()]
    torch.testing.assert_close(run_moe(moe, x_TD, *params), run_reference(moe, x_TD, *params),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_shared_experts", [0, 1])
def test_float64_layer_ignores_autocast(n_shared_experts):
    """Autocast leaves float64 alone (only fp32 is eligible), and so does the layer: before,
    it cast x and the routed experts to bf16 anyway (silently; with shared experts, whose
    nn.Linear autocast leaves fp64, the add then failed on mixed dtypes)."""
    moe = make_moe(torch.float64, n_shared_experts=n_shared_experts)
    x_TD = torch.randn(20, 32, dtype=torch.float64)
    want = moe(x_TD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = moe(x_TD)
    assert got.dtype == torch.float64
    assert torch.equal(got, want)


def test_layer_pickled_before_expert_parallelism_and_entropy_still_runs():
    # A MoE saved whole (torch.save(model)) before ep_group, expert_range and
    # collect_router_entropy existed has none of them; before: AttributeError on its
    # first forward.
    import io

    moe = make_moe()
    for name in ("ep_group", "expert_range", "collect_router_entropy"):
        del moe.__dict__[name]  # what an old pickle restores
    x_TD = torch.randn(6, 32)
    y_TD = moe(x_TD)
    buffer = io.BytesIO()
    torch.save(moe, buffer)
    buffer.seek(0)
    old = torch.load(buffer, weights_only=False)
    assert old.expert_range == range(8) and old.ep_group is None
    assert not old.collect_router_entropy
    assert torch.equal(old(x_TD), y_TD)
