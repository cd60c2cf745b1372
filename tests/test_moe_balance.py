"""The MoE layer's load balancing against formulas written out in plain PyTorch: the
Switch aux loss and the z-loss from the router's fused sums (values and router-weight
gradients, on the GPU too), what they and the selection bias count (the routing before
capacity), and the auxiliary-loss-free bias updates (update_bias)."""
import pytest
import torch
from torch import nn

import dsv3
from conftest import DEVICES, assert_close
from test_moe import make_input, make_moe, param_names, reference_experts, run_reference


def test_stats_and_aux_losses():
    moe = make_moe(aux_loss_coef=0.1, z_loss_coef=0.01)
    x_TD = torch.randn(50, 32)
    moe(x_TD)
    logits_TE = x_TD @ moe.router.weight.detach().T
    counts_E = torch.bincount(reference_experts(moe, x_TD).flatten(), minlength=8)
    fraction_E = counts_E.float() / (50 * 2)
    want_aux = 0.1 * 8 * (fraction_E * logits_TE.softmax(-1).mean(0)).sum()
    want_z = 0.01 * logits_TE.logsumexp(-1).square().mean()
    stats = moe.last_stats
    assert stats.tokens_per_expert.dtype == torch.int32
    assert torch.equal(stats.tokens_per_expert.long(), counts_E)
    assert stats.dropped_tokens.item() == 0
    assert_close(stats.aux_loss, want_aux, "aux_loss")
    assert_close(stats.z_loss, want_z, "z_loss")
    for t in (stats.tokens_per_expert, stats.dropped_tokens, stats.aux_loss, stats.z_loss):
        assert not t.requires_grad
    # The layer's aux_loss is their sum and trains the router.
    assert_close(moe.aux_loss.detach(), want_aux + want_z, "aux_loss total")
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cast", ["to", "half"])
def test_the_selection_bias_stays_fp32_when_the_layer_is_cast(cast):
    """Steps of 1e-3 vanish in a bf16/fp16 bias near 0.5: model.to(bf16) must leave it
    fp32, as building the layer in that dtype does, and its updates must still land."""
    moe = make_moe(score="sigmoid", aux_loss_coef=0.0, bias_update_rate=1e-3)
    moe = moe.to(torch.bfloat16) if cast == "to" else moe.half()
    low = moe.gate_up_proj.dtype
    assert moe.expert_bias.dtype == torch.float32 and moe.gate_up_proj.dtype != torch.float32
    moe.train()
    moe.expert_bias.fill_(0.5)
    x = make_input(moe, (64,), low, hot_expert=1)
    for _ in range(5):
        moe(x)
        moe.update_bias()
    assert_close(moe.expert_bias[0], torch.tensor(0.505), "an under-loaded expert's bias")


@pytest.mark.parametrize("capacity_factor", [0.25, 1.0])
def test_balance_loss_and_bias_see_the_routing_before_capacity(capacity_factor):
    """The load fraction of the Switch loss and the bias's counts are the router's
    choices, not what capacity left: with every token on one expert, the clamped
    counts would shrink the loss (and its gradient) the harder the routing tilts."""
    dropless, capped = (make_moe(top_k=1, aux_loss_coef=0.1, bias_update_rate=1e-3,
                                 capacity_factor=capacity, score="sigmoid")
                        for capacity in (None, capacity_factor))
    x = make_input(dropless, (48,), torch.float32, hot_expert=3)
    capped.load_state_dict(dropless.state_dict())  # the same weights, hot router included
    for layer in (dropless, capped):
        layer.train()
        layer(x)
    assert (dropless.last_stats.tokens_per_expert[3] == 48).item()  # all on one expert
    assert capped.last_stats.dropped_tokens.item() > 0  # capacity did cut
    assert_close(capped.aux_loss.detach(), dropless.aux_loss.detach(), "aux_loss")
    assert torch.equal(capped.pending_counts, dropless.pending_counts)
    assert capped.last_stats.tokens_per_expert.sum() < dropless.last_stats.tokens_per_expert.sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("z_loss_coef", [0.0, 0.01], ids=["aux_only", "aux_and_z"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_aux_loss_gradient_matches_formula(score, z_loss_coef, device):
    """The router's fused loss sums give the same router-weight gradient as the
    Switch aux loss and z-loss written out in plain PyTorch; with z_loss_coef 0 (the
    default) the router's backward takes no z-loss gradient, a variant of its own."""
    moe = make_moe(aux_loss_coef=0.1, z_loss_coef=z_loss_coef, score=score).to(device)
    x_TD = torch.randn(50, 32, device=device)
    moe(x_TD)
    moe.aux_loss.backward()
    router_ED = moe.router.weight.detach().clone().requires_grad_()
    logits_TE = x_TD @ router_ED.T
    scores_TE = logits_TE.softmax(-1) if score == "softmax" else logits_TE.sigmoid()
    scores_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
    counts_E = torch.bincount(reference_experts(moe, x_TD).flatten(), minlength=8)
    want = (0.1 * 8 * (counts_E.float() / 100 * scores_TE.mean(0)).sum()
            + z_loss_coef * logits_TE.logsumexp(-1).square().mean())
    want.backward()
    assert_close(moe.router.weight.grad, router_ED.grad, "d(router weight) of aux_loss")


def test_aux_losses_are_zero_in_eval():
    moe = make_moe(aux_loss_coef=0.1, z_loss_coef=0.01).eval()
    moe(torch.randn(10, 32))
    assert moe.aux_loss.item() == 0 and moe.last_stats.z_loss.item() == 0


def test_moe_aux_loss_sums_every_layer():
    model = nn.Sequential(make_moe(aux_loss_coef=0.1), nn.Linear(32, 32),
                          nn.Sequential(make_moe(aux_loss_coef=0.2, z_loss_coef=0.01)))
    model(torch.randn(20, 32))
    first, second = model[0], model[2][0]
    total = dsv3.moe_aux_loss(model)
    assert_close(total.detach(), (first.aux_loss + second.aux_loss).detach(), "moe_aux_loss")
    assert total.requires_grad
    total.backward()
    assert first.router.weight.grad.abs().sum() > 0 and second.router.weight.grad.abs().sum() > 0


def test_moe_aux_loss_without_moe_layers_is_zero():
    total = dsv3.moe_aux_loss(nn.Linear(4, 4))
    assert total.item() == 0 and total.dim() == 0


def test_update_bias_balances_load():
    """DeepSeek-V3 aux-loss-free balancing: over-loaded experts' bias goes down,
    under-loaded ones' up; selection follows, weights stay unbiased."""
    moe = make_moe(score="sigmoid", top_k=1, bias_update_rate=0.5)
    assert "expert_bias" not in param_names(moe) and "expert_bias" in moe.state_dict()
    x = make_input(moe, (64,), torch.float32, hot_expert=6)
    moe(x)
    counts_E = moe.last_stats.tokens_per_expert.clone()
    assert counts_E[6] == 64
    moe.update_bias()
    assert moe.expert_bias[6] < 0 and (moe.expert_bias[torch.arange(8) != 6] > 0).all()
    assert (moe.pending_counts == 0).all()

    y = moe(x)  # the bias now steers tokens away from expert 6
    assert moe.last_stats.tokens_per_expert[6] < 64
    assert_close(y, run_reference(moe, x, *[p.detach() for p in moe.parameters()]))
    # Weights are the unbiased sigmoid scores of the chosen experts.
    logits_TE = x @ moe.router.weight.detach().T
    weights_TK, experts_TK, _ = dsv3.ops.route(logits_TE, 1, "sigmoid", moe.expert_bias,
                                               normalize=False)
    assert_close(weights_TK, logits_TE.sigmoid().gather(1, experts_TK.long()), "weights")


def test_update_bias_uses_counts_since_last_call():
    moe = make_moe(bias_update_rate=0.1)
    x1, x2 = torch.randn(10, 32), torch.randn(30, 32)
    moe(x1)
    first = moe.last_stats.tokens_per_expert.clone()
    moe(x2)  # gradient accumulation: two micro-batches, one step
    total_E = (first + moe.last_stats.tokens_per_expert).float()
    moe.eval()
    moe(torch.randn(50, 32))  # eval forwards do not count
    moe.update_bias()
    assert torch.equal(moe.expert_bias, 0.1 * torch.sign(total_E.mean() - total_E))


def test_moe_update_bias_reaches_every_layer_and_skips_bias_free_ones():
    model = nn.Sequential(make_moe(bias_update_rate=0.1), make_moe(bias_update_rate=0.2),
                          make_moe())
    x = make_input(model[0], (32,), torch.float32, hot_expert=1)
    model(x)
    dsv3.moe_update_bias(model)
    assert model[2].expert_bias is None
    for layer in model[:2]:
        assert layer.expert_bias.abs().sum() > 0 and (layer.pending_counts == 0).all()


def test_update_bias_is_a_noop_without_rate():
    moe = make_moe()
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    moe(torch.randn(8, 32))
    moe.update_bias()
    assert all(torch.equal(v, moe.state_dict()[k]) for k, v in before.items())


def test_reentrant_checkpointing_counts_a_batch_once_and_warns_of_the_lost_loss():
    """Its first pass runs under no_grad and the replay in backward runs the layer
    again. Before: the selection bias counted the batch twice, and the aux_loss of the
    first pass (no gradient) left the router untrained by it, without a word."""
    from torch.utils.checkpoint import checkpoint
    x_TD = torch.randn(40, 32)
    plain = make_moe(bias_update_rate=1e-3, aux_loss_coef=0.1)
    plain(x_TD).sum().backward()
    moe = make_moe(bias_update_rate=1e-3, aux_loss_coef=0.1)
    moe.load_state_dict(plain.state_dict())
    with pytest.warns(UserWarning, match=r"aux_loss carries no gradient.*use_reentrant=False"):
        y = checkpoint(moe, x_TD.requires_grad_(), use_reentrant=True)
    assert not moe.aux_loss.requires_grad
    y.sum().backward()
    assert torch.equal(moe.pending_counts, plain.pending_counts)
    assert plain.pending_counts.sum() == 40 * 2
