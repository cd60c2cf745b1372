"""What dsv3 refuses or accepts, per transformers architecture and mode: models with no
supported MoE block, the modes of a listed architecture that dsv3.MoE does not compute
(refused with the reason, all or nothing, by patch_moe, from_module and to_module alike)
and the settings next to them that it does compute, DeepSeek-V2's group-limited routing,
Laguna's routed scale, experts stored transposed, non-SwiGLU experts, to_module's config
checks, and the clamped SwiGLU of GLM-5-Next, HunYuan-V4 (routed experts only) and
DeepSeek-V4 (taken only from the known classes, with a valid limit), experts whose
act_fn is the function F.silu (LFM2-MoE), per-layer top-k (HunYuan-MoE-V1) and frozen
bias Parameters kept fp32 buffers (AFMoE, Laguna). The numerical
equivalence of the supported models is in test_transformers_integration.py."""
import dataclasses
import re

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")  # only where it is not installed; CI has it

from conftest import assert_close
from hf_models import (GLM5_NEXT_SWIGLU_LIMIT, HY_V4_SWIGLU_LIMIT, LAGUNA_ROUTED_SCALE, N_SPARSE,
                       decoder_layers, input_ids, missing, sparse_block, tiny_config, tiny_model,
                       transformers)
from transformers_support import PLAIN_CONFIGS, DsvOpLog, arch_param

import dsv3
import dsv3.integrations.transformers as dt

# --- bad input --------------------------------------------------------------------------------
def test_patch_moe_rejects_unsupported_models():
    llama = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4))
    pattern = (r"patch_moe: model \(LlamaForCausalLM\) has no sparse MoE block dsv3 supports; "
               r"supported architectures: Mixtral \(MixtralSparseMoeBlock\), Qwen2-MoE .*"
               r"Qwen3-MoE .*DeepSeek-V3 \(DeepseekV3MoE\)")
    with pytest.raises(TypeError, match=pattern):
        dt.patch_moe(llama)
    with pytest.raises(TypeError, match="patch_moe: model must be a torch.nn.Module, got str"):
        dt.patch_moe("mixtral")
    with pytest.raises(TypeError, match=r"block: Linear is not a supported sparse MoE block"):
        dt.from_module(nn.Linear(2, 2))
    block = tiny_model("mixtral").model.layers[0].mlp
    with pytest.raises(TypeError, match=r"model is itself a MixtralSparseMoeBlock; .*from_module"):
        dt.patch_moe(block)


def test_a_block_whose_router_class_is_missing_is_not_taken(monkeypatch):
    """A listed block class in a release without the router class it is listed with routes
    otherwise (transformers 5.17's JambaSparseMoeBlock: through an nn.Linear, with no
    JambaTopKRouter): not taken."""
    from transformers.models.jamba import modeling_jamba
    model = tiny_model("jamba")
    monkeypatch.delattr(modeling_jamba, "JambaTopKRouter", raising=False)
    with pytest.raises(TypeError, match=r"\(JambaForCausalLM\) has no sparse MoE block dsv3 "
                                        r"supports"):
        dt.patch_moe(model)


# Modes of a listed architecture that dsv3.MoE does not compute: (config overrides, the
# refused setting and the start of the reason, as the message says them).
REFUSED_MODES = [
    # top_k=3 of the one kept group's 2 experts: transformers adds another group's.
    arch_param("deepseek_v2", dict(topk_method="group_limited_greedy", topk_group=1),
          "DeepSeek-V2 with topk_method='group_limited_greedy' (n_group=4, topk_group=1) "
          "with top_k=3", "top_k is above the kept groups' experts"),
    arch_param("cohere2_moe", dict(expert_selection_fn="sigmoid"),
          "Cohere2-MoE with expert_selection_fn='sigmoid'",
          "it picks the top-k logits, dsv3.MoE the top-k scores"),
    arch_param("cohere2_moe", dict(shared_expert_combination_strategy="average"),
          "Cohere2-MoE with shared_expert_combination_strategy='average'",
          r"it returns \(routed \+ shared\) / 2, dsv3.MoE routed \+ shared"),
    # A moe_norm_min the chosen weights' sum may fall below (the bound: 1/(2E) = 1/12).
    arch_param("ernie4_5_moe", dict(moe_norm_min=0.5), "ERNIE-4.5-MoE with moe_norm_min=0.5",
               "transformers divides the chosen weights by moe_norm_min where their sum is "
               "smaller, dsv3.MoE by the sum"),
    # top_k=3 of the one kept group's 2 experts: transformers adds another group's, at 0.
    arch_param("mistral4", dict(topk_group=1),
               "Mistral-4 with n_group=4, topk_group=1 with top_k=3",
               "top_k is above the kept groups' experts"),
    # Groups zero the left-out experts' selection scores, which a kept one (with a
    # negative bias) may fall below.
    arch_param("axk2", dict(n_group=2, topk_group=1), "A.X-K2 with n_group=2, topk_group=1",
               r"it sets the left-out groups' selection scores \(sigmoid \+ bias\) to 0"),
    arch_param("laguna", dict(moe_router_logit_softcapping=30.0),
               "Laguna with moe_router_logit_softcapping=30.0",
               "it routes on tanh-softcapped logits"),
    # dsv3.MoE's route_scale is > 0.
    arch_param("laguna", dict(moe_routed_scaling_factor=0.0),
               "Laguna with moe_routed_scaling_factor=0.0",
               "it scales the routed output by it, dsv3.MoE by a route_scale that is a finite "
               "number > 0"),
    # Mistral-Large-4: Mistral-4's groups (its text config's).
    arch_param("mistral_large4", dict(topk_group=1),
               "Mistral-Large-4 with n_group=4, topk_group=1 with top_k=3",
               "top_k is above the kept groups' experts"),
]


@pytest.mark.skipif(missing("deepseek_v2") is not None, reason=str(missing("deepseek_v2")))
def test_group_limited_deepseek_v2_without_groups_is_refused():
    # Before: n_group = topk_group = None read as "every group kept" and ran as greedy,
    # where transformers' own forward fails.
    model = tiny_model("deepseek_v2", topk_method="group_limited_greedy", n_group=None,
                       topk_group=None)
    with pytest.raises(ValueError, match=r"n_group=None, topk_group=None\) cannot become"):
        dt.patch_moe(model)


@pytest.mark.parametrize(("arch", "overrides", "setting", "why"), REFUSED_MODES)
def test_refused_modes_say_why(arch, overrides, setting, why):
    """patch_moe raises the reason and replaces nothing (not even a block it could take);
    from_module and to_module refuse the same way."""
    model = tiny_model(arch, **overrides)
    ids = input_ids()
    want = model(ids).logits
    message = rf"{re.escape(setting)} cannot become a dsv3.MoE: {why}"
    # patch_moe names the refused block's path in the model
    with pytest.raises(ValueError, match=rf"^patch_moe: [\w.]*layers\.\d+\.mlp: {message}"):
        dt.patch_moe(model)
    assert not any(isinstance(m, dt.TransformersMoE) for m in model.modules())
    assert_close(model(ids).logits, want, "logits after the refusal")
    with pytest.raises(ValueError, match=rf"^block: {message}"):
        dt.from_module(sparse_block(model))
    moe = dsv3.MoE(dsv3.MoEConfig(dim=32, **PLAIN_CONFIGS[arch]))
    with pytest.raises(ValueError, match=rf"^hf_config: {message}"):
        dt.to_module(moe, tiny_config(arch, **overrides))


def test_a_refused_block_leaves_every_other_block_unpatched():
    """All or nothing: with a block it can take before the refused one, patch_moe
    replaces neither (before: the first was patched, the model left half converted)."""
    both = nn.ModuleDict({"ok": tiny_model("deepseek_v2"),
                          "refused": tiny_model("deepseek_v2", topk_method="group_limited_greedy",
                                                topk_group=1)})
    with pytest.raises(ValueError, match="group_limited_greedy"):
        dt.patch_moe(both)
    assert not any(isinstance(m, dt.TransformersMoE) for m in both.modules())
    assert dt.patch_moe(both["ok"]) == N_SPARSE["deepseek_v2"]  # it could take the first


# Settings next to a refused mode that still compute dsv3.MoE's function.
ACCEPTED_MODES = [
    # Every group kept: greedy.
    arch_param("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=2, topk_group=2)),
    # Groups by their best expert (group_score="max"): 1 of 2 groups of 4; 3 of 8 groups
    # of 1 (the best is the only one); 3 of 4 groups of 2, top_k = all the kept experts.
    arch_param("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=2, topk_group=1)),
    arch_param("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=8, topk_group=3)),
    arch_param("deepseek_v2", dict(topk_method="group_limited_greedy", topk_group=3,
                              num_experts_per_tok=6)),
    # No shared experts: nothing to average.
    arch_param("cohere2_moe", dict(shared_expert_combination_strategy="average",
                              num_shared_experts=0)),
    # norm_topk_prob is read for sigmoid only.
    arch_param("cohere2_moe", dict(norm_topk_prob=False)),
    # No clamp (a sum is > 0 here), and one just inside the bound with the bias' 0.08.
    arch_param("ernie4_5_moe", dict(moe_norm_min=0.0)),
    arch_param("ernie4_5_moe_no_shared", dict(moe_norm_min=0.003)),
    # Every group kept: nothing zeroed.
    arch_param("axk2", dict(n_group=3, topk_group=3)),
    # No groups; every group kept; top_k = all the kept groups' experts (4 of 2 groups of 2).
    arch_param("mistral4", dict(n_group=1, topk_group=1)),
    arch_param("mistral4", dict(topk_group=4)),
    arch_param("mistral4", dict(num_experts_per_tok=4, norm_topk_prob=True)),
    arch_param("mistral_large4", dict(n_group=1, topk_group=1)),
    # The block's routed scale, 1 (the tiny model's is 2.5).
    arch_param("laguna", dict(moe_routed_scaling_factor=1.0)),
]


@pytest.mark.parametrize(("arch", "overrides"), ACCEPTED_MODES)
def test_accepted_modes_next_to_refused_ones(arch, overrides):
    block = sparse_block(tiny_model(arch, **overrides))
    moe = dt.from_module(block)
    x = torch.randn(3, 5, 32)
    assert_close(moe(x), block(x), "from_module output")
    assert_close(dt.to_module(moe)(x), block(x), "to_module output")


@pytest.mark.skipif(missing("deepseek_v2") is not None, reason=str(missing("deepseek_v2")))
def test_deepseek_v2_group_limited_greedy_scores_groups_by_their_best_expert():
    """group_limited_greedy becomes group_score="max" (the other way, "top2_sum", gives
    another output on the same tokens: the tiny model's tests see the difference)."""
    block = decoder_layers(tiny_model("deepseek_v2_group_limited"))[1].mlp
    moe = dt.from_module(block)
    c = moe.config
    assert (c.score, c.n_groups, c.topk_groups, c.group_score) == ("softmax", 4, 2, "max")
    x = torch.randn(3, 5, 32)
    assert_close(moe(x), block(x), "from_module output")
    moe.config = dataclasses.replace(c, group_score="top2_sum")
    assert not torch.allclose(moe(x), block(x), rtol=1e-3, atol=1e-3)


def test_laguna_routed_scale_is_the_blocks():
    """Laguna scales its routed output in the block (moe_routed_scaling_factor, 2.5 in the
    tiny model): dsv3.MoE's route_scale, read from the block, not its router (without it,
    another output)."""
    block = decoder_layers(tiny_model("laguna"))[1].mlp
    assert block.routed_scaling_factor == LAGUNA_ROUTED_SCALE != 1.0
    moe = dt.from_module(block)
    assert moe.config.route_scale == LAGUNA_ROUTED_SCALE
    x = torch.randn(3, 5, 32)
    assert_close(moe(x), block(x), "from_module output")
    moe.config = dataclasses.replace(moe.config, route_scale=1.0)
    assert not torch.allclose(moe(x), block(x), rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(missing("ernie4_5_moe") is not None, reason=str(missing("ernie4_5_moe")))
def test_ernie_bias_that_lets_the_clamp_act_is_refused():
    """ERNIE-4.5-MoE chooses on softmax + bias: a bias of wide range can choose experts
    whose probabilities sum below moe_norm_min, where transformers divides by
    moe_norm_min (a weight sum below 1) and dsv3.MoE by the sum. Such a bias is refused
    at the default moe_norm_min too (the clamp acts on a block built to show it), and so
    is a bias not loaded yet (meta): its values decide."""
    model = tiny_model("ernie4_5_moe")
    block = decoder_layers(model)[1].mlp
    with torch.no_grad():  # expert 0 wins every token by far (p ~ 1), the bias picks 4, 5
        block.gate.weight.zero_()
        block.gate.weight[0] = 10.0
        block.gate.moe_statics.e_score_correction_bias.copy_(
            torch.tensor([[0.0, 0.0, 0.0, 0.0, 2.0, 2.0]]))
    x = torch.randn(3, 5, 32).abs()  # logit of expert 0 >= 0; the others' 0
    x[..., 0] += 5  # a logit gap of at least 50: the chosen p < 1e-12 = moe_norm_min
    _, weights_TK, experts_TK = block.gate(x.view(-1, 32))
    assert (experts_TK.sort(-1).values == torch.tensor([4, 5])).all()
    assert (weights_TK.sum(-1) < 1e-3).all()  # the clamp acted: the weights do not sum to 1
    message = (r"ERNIE-4.5-MoE with moe_norm_min=1e-12 cannot become a dsv3.MoE: transformers "
               r"divides the chosen weights by moe_norm_min where their sum is smaller")
    with pytest.raises(ValueError, match=rf"^patch_moe: model\.layers\.\d+\.mlp: {message}"):
        dt.patch_moe(model)
    assert not any(isinstance(m, dt.TransformersMoE) for m in model.modules())
    moe = dsv3.MoE(dsv3.MoEConfig(dim=32, **PLAIN_CONFIGS["ernie4_5_moe"]))
    moe.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0, 2.0]))
    with pytest.raises(ValueError, match=rf"^hf_config: {message}"):
        dt.to_module(moe, tiny_config("ernie4_5_moe"))
    with torch.device("meta"):
        meta_block = type(block)(tiny_config("ernie4_5_moe"))
    with pytest.raises(ValueError, match=r"^block: ERNIE-4.5-MoE with moe_norm_min=1e-12 and a "
                                         r"selection bias on the meta device cannot become"):
        dt.from_module(meta_block)


def test_experts_implementation_transposed_layout():
    """Experts stored [E, in, out] (``is_transposed``, as some models do) run on the same
    kernels as a view-free input: same output and grads as the [out, in] layout."""
    experts = tiny_model("mixtral", experts_implementation="dsv3").model.layers[0].mlp.experts
    x_TD = torch.randn(7, 32)
    top_k_index = torch.rand(7, 4).argsort(1)[:, :2]
    top_k_weights = torch.rand(7, 2)
    runs = []
    for transposed in (False, True):
        if transposed:  # store the same weights transposed, as new contiguous Parameters
            experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach().transpose(1, 2)
                                                .contiguous())
            experts.down_proj = nn.Parameter(experts.down_proj.detach().transpose(1, 2)
                                             .contiguous())
            experts.is_transposed = True
        y_TD = experts(x_TD, top_k_index, top_k_weights)
        grads = torch.autograd.grad(y_TD.square().sum(), [experts.gate_up_proj, experts.down_proj])
        runs.append((y_TD.detach(), [g.transpose(1, 2) if transposed else g for g in grads]))
    (want, want_grads), (got, got_grads) = runs
    assert_close(got, want, "output")
    for g, w in zip(got_grads, want_grads, strict=True):
        assert_close(g, w, "weight grad")


def test_a_refusal_keeps_its_class_with_the_blocks_path():
    """A WrongType (a TypeError and a ValueError both) was re-raised as a plain
    TypeError, which `except ValueError` no longer caught."""
    from dsv3.validate import WrongType
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("mixtral"))
    block = model.model.layers[0].mlp
    block.top_k = block.gate.top_k = 2.5
    with pytest.raises(WrongType, match=r"^patch_moe: model\.layers\.0\.mlp: MoEConfig: top_k "
                                        r"must be a whole number, got 2.5"):
        dt.patch_moe(model)


def test_non_swiglu_experts_are_refused():
    config = tiny_config("mixtral")
    config.hidden_act = "gelu"
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"patch_moe: model\.layers\.0\.mlp: .* cannot become "
                                         r"a dsv3.MoE: its activation "
                                         r"is GELUActivation, not SiLU"):
        dt.patch_moe(model)
    model.set_experts_implementation("dsv3")
    with pytest.raises(NotImplementedError, match=r'experts_implementation="dsv3" cannot run '
                                                  r"MixtralExperts: its activation is GELU"):
        model(input_ids())


def test_plain_moe_to_module_checks_the_config():
    moe = dsv3.MoE(dsv3.MoEConfig(dim=32, ffn_dim=48, n_experts=4, top_k=1))
    with pytest.raises(ValueError, match=r"hf_config: .*top_k=1 vs 2"):
        dt.to_module(moe, tiny_config("mixtral"))
    with pytest.raises(ValueError, match="hf_config: required"):
        dt.to_module(moe)
    with pytest.raises(ValueError, match=r"model_type 'llama' is not supported.*Mixtral"):
        dt.to_module(moe, transformers.LlamaConfig())


def test_to_module_of_an_expert_parallel_shard_is_refused():
    """Rank 0's layer of 2-way expert parallelism holds experts 0-1 of 4: no transformers
    block computes that (before, one was built whose router chose experts it lacked)."""
    moe = dsv3.MoE(dsv3.MoEConfig(dim=32, ffn_dim=48, n_experts=4, top_k=2))
    moe.gate_up_proj = nn.Parameter(moe.gate_up_proj[:2].detach().clone())
    moe.down_proj = nn.Parameter(moe.down_proj[:2].detach().clone())
    moe.expert_range = range(0, 2)
    with pytest.raises(ValueError, match=r"moe: holds 2 of its 4 experts \(experts 0-1, "
                                         r"expert-parallel"):
        dt.to_module(moe, tiny_config("mixtral"))


# --- the clamped SwiGLU (GLM-5-Next, DeepSeek-V4, HunYuan-V4) -------------------------------
@pytest.mark.skipif(missing("glm5_next") is not None, reason=str(missing("glm5_next")))
def test_glm5_next_clamp_is_active():
    """In the tiny GLM-5-Next the clamp changes what the block computes, so the tests
    comparing it with transformers would fail without it: many gate/up values pass the
    limit, and a patched model whose routed experts forget the clamp has other logits."""
    model = tiny_model("glm5_next")
    block = decoder_layers(model)[1].mlp
    assert block.experts.swiglu_limit == GLM5_NEXT_SWIGLU_LIMIT
    seen = []
    block.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    ids = input_ids()
    want = model(ids).logits
    h_TE2F = torch.einsum("td,efd->tef", seen[0].reshape(-1, 32), block.experts.gate_up_proj)
    assert (h_TE2F.abs() > GLM5_NEXT_SWIGLU_LIMIT).float().mean() > 0.2
    dt.patch_moe(model)
    moe = decoder_layers(model)[1].mlp
    assert moe.config.swiglu_limit == GLM5_NEXT_SWIGLU_LIMIT
    assert_close(model(ids).logits, want, "logits")
    moe.config = dataclasses.replace(moe.config, swiglu_limit=None)
    assert not torch.allclose(model(ids).logits, want, rtol=1e-3, atol=1e-3)


def _clamped_experts(arch: str, limit: float):
    """A lone clamped-SwiGLU experts module (GLM-5-Next's, HunYuan-V4's, -VL's or
    DeepSeek-V4's), random weights of std 0.3: with x ~ N(0, 1), gate and up have std 1.7."""
    if arch == "glm5_next":
        from transformers.models.glm5_next import modeling_glm5_next as m
        config = tiny_config("glm5_next").text_config
        config.swiglu_limit = limit
        experts = m.Glm5NextTextExperts(config)
    elif arch in ("hy_v4", "hy_v4_vl"):
        config = tiny_config(arch, swiglu_limit=limit).get_text_config()
        if arch == "hy_v4":
            from transformers.models.hy_v4 import modeling_hy_v4 as m
            experts = m.HYV4Experts(config)
        else:
            from transformers.models.hy_v4_vl import modeling_hy_v4_vl as m
            experts = m.HYV4VLExperts(config)
    else:
        from transformers.models.deepseek_v4 import modeling_deepseek_v4 as m
        config = transformers.DeepseekV4Config(hidden_size=32, moe_intermediate_size=24,
                                               n_routed_experts=6, swiglu_limit=limit)
        experts = m.DeepseekV4Experts(config)
    with torch.no_grad():
        for weight in (experts.gate_up_proj, experts.down_proj):
            weight.normal_(0, 0.3)
    return experts


@pytest.mark.parametrize("arch", [arch_param(a) for a in ("glm5_next", "deepseek_v4", "hy_v4",
                                                          "hy_v4_vl")])
def test_clamped_swiglu_experts_run_on_dsv3(arch):
    """experts_implementation="dsv3" takes the known clamped-SwiGLU experts classes and
    computes their _apply_gate (the limit read from the module): output and every
    gradient as their own forward."""
    experts = _clamped_experts(arch, 2.0)
    x_TD = torch.randn(11, 32)
    n_experts = experts.gate_up_proj.shape[0]
    top_k_index = torch.rand(11, n_experts).argsort(1)[:, :3]
    top_k_weights = torch.rand(11, 3)
    runs = []
    for implementation in ("eager", "dsv3"):
        experts.config._experts_implementation = implementation
        x = x_TD.clone().requires_grad_()
        with DsvOpLog() as log:
            y_TD = experts(x, top_k_index, top_k_weights)
        assert ("swiglu" in log.ops) == (implementation == "dsv3")
        grad_y = torch.randn(y_TD.shape, generator=torch.Generator().manual_seed(2))
        runs.append([y_TD.detach(), *torch.autograd.grad(
            y_TD, [x, experts.gate_up_proj, experts.down_proj], grad_y)])
    for got, want, what in zip(runs[1], runs[0], ["output", "grad of x", "grad of gate_up",
                                                   "grad of down"], strict=True):
        assert_close(got, want, what)
    # The limit was in force: without it the function differs.
    experts.config._experts_implementation = "eager"
    h = torch.einsum("td,efd->tef", x_TD, experts.gate_up_proj.detach())
    assert (h.abs() > 2.0).float().mean() > 0.2


@pytest.mark.skipif(missing("glm5_next") is not None, reason=str(missing("glm5_next")))
def test_unknown_or_broken_clamped_experts_are_refused():
    """Only the listed classes are taken, by exact class: a subclass (which may gate
    otherwise) is refused, and so is a limit that is not a finite number > 0."""
    experts = _clamped_experts("glm5_next", 2.0)
    sub = type("MyExperts", (type(experts),), {})
    experts.__class__ = sub
    reason = dt.experts.unsupported_reason(experts)
    assert reason is not None and "_apply_gate" in reason
    experts.__class__ = sub.__mro__[1]
    assert dt.experts.unsupported_reason(experts) is None
    experts.swiglu_limit = 0.0
    assert dt.experts.unsupported_reason(experts) == (
        "its SwiGLU clamp limit (swiglu_limit=0.0) is not a finite number > 0")


@pytest.mark.skipif(missing("glm5_next") is not None, reason=str(missing("glm5_next")))
def test_plain_moe_to_module_checks_the_swiglu_limit():
    """A dsv3.MoE becomes a clamped block only with the block's limit, and a clamped
    dsv3.MoE never becomes an unclamped block."""
    unclamped = {**PLAIN_CONFIGS["glm5_next"], "swiglu_limit": None}
    with pytest.raises(ValueError, match=r"hf_config: .*swiglu_limit=None vs 1.0"):
        dt.to_module(dsv3.MoE(dsv3.MoEConfig(dim=32, **unclamped)), tiny_config("glm5_next"))
    clamped = {**PLAIN_CONFIGS["deepseek_v3"], "swiglu_limit": 1.0}
    with pytest.raises(ValueError, match=r"hf_config: .*swiglu_limit=1.0 vs None"):
        dt.to_module(dsv3.MoE(dsv3.MoEConfig(dim=32, **clamped)), tiny_config("deepseek_v3"))
    # GLM-5-Next's HF shared MLP clamps: fused shared experts without the clamp are refused.
    moe = dsv3.MoE(dsv3.MoEConfig(dim=32, **PLAIN_CONFIGS["glm5_next"]))
    moe.shared_experts.swiglu_limit = None
    with pytest.raises(ValueError, match=r"moe: its shared experts clamp their SwiGLU with "
                                         r"swiglu_limit=None, the GLM-5-Next block's with 1.0"):
        dt.to_module(moe, tiny_config("glm5_next"))


@pytest.mark.parametrize("arch", [arch_param("hy_v4"), arch_param("hy_v4_vl")])
def test_hy_v4_clamps_its_routed_experts_only(arch):
    """HunYuan-V4 clamps the SwiGLU of its routed experts (swiglu_limit, active in the tiny
    model), not its shared experts'. patch_moe keeps the HF shared MLP (unclamped) and
    clamps the routed experts, as transformers; without the clamp, other logits."""
    model = tiny_model(arch)
    block = decoder_layers(model)[1].mlp
    assert block.experts.swiglu_limit == HY_V4_SWIGLU_LIMIT
    seen = []
    block.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    ids = input_ids()
    want = model(ids).logits
    x_TD = seen[0].reshape(-1, 32)
    h_TE2F = torch.einsum("td,efd->tef", x_TD, block.experts.gate_up_proj)
    assert (h_TE2F.abs() > HY_V4_SWIGLU_LIMIT).float().mean() > 0.2
    shared = block.shared_experts  # its gate and up pass the limit too: a clamp would show
    assert (shared.gate_proj(x_TD).abs() > HY_V4_SWIGLU_LIMIT).float().mean() > 0.2
    dt.patch_moe(model)
    moe = decoder_layers(model)[1].mlp
    assert moe.config.swiglu_limit == HY_V4_SWIGLU_LIMIT
    assert moe.shared_experts is shared  # the HF module: no clamp
    assert_close(model(ids).logits, want, "logits")
    moe.config = dataclasses.replace(moe.config, swiglu_limit=None)
    assert not torch.allclose(model(ids).logits, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("arch", [arch_param("hy_v4"), arch_param("hy_v4_vl")])
def test_plain_moe_with_clamped_shared_experts_is_refused_for_hy_v4(arch):
    """A plain dsv3.MoE clamps its fused shared experts with swiglu_limit; HunYuan-V4's
    shared MLP does not clamp, so to_module refuses it (a split would compute another
    function), and converts it once its shared experts' clamp is lifted."""
    config = dsv3.MoEConfig(dim=32, ffn_dim=24, n_experts=8, top_k=3, n_shared_experts=1,
                            score="sigmoid", n_groups=4, topk_groups=2, route_scale=2.5,
                            bias_update_rate=1e-3, swiglu_limit=HY_V4_SWIGLU_LIMIT)
    moe = dsv3.MoE(config)
    with torch.no_grad():
        moe.expert_bias.copy_(0.1 * torch.randn(8))
    name = "HunYuan-V4-VL" if arch == "hy_v4_vl" else "HunYuan-V4"
    with pytest.raises(ValueError, match=rf"moe: its shared experts clamp their SwiGLU with "
                                         rf"swiglu_limit=1.0, the {name} block's with None"):
        dt.to_module(moe, tiny_config(arch))
    x = 3 * torch.randn(2, 7, 32)  # gate and up of the shared experts pass the limit
    clamped = moe(x)
    moe.shared_experts.swiglu_limit = None
    block = dt.to_module(moe, tiny_config(arch))
    assert block.experts.gate_up_proj is moe.gate_up_proj
    assert_close(block(x), moe(x), "HF block output")
    assert not torch.allclose(block(x), clamped, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(missing("dots3_note") is not None, reason=str(missing("dots3_note")))
def test_plain_moe_to_module_checks_the_shared_width():
    """A shared MLP whose width is no multiple of the experts' (dots3-note's is
    shared_experts_intermediate_size wide) counts as width // ffn_dim shared experts; a
    plain dsv3.MoE's fused shared experts of another width are refused, not split into it."""
    moe = dsv3.MoE(dsv3.MoEConfig(dim=32, **{**PLAIN_CONFIGS["dots3_note"],
                                             "n_shared_experts": 1}))
    with pytest.raises(ValueError, match=r"hf_config: its dots3-note block's shared MLP is 40 "
                                         r"wide, moe's shared experts 24"):
        dt.to_module(moe, tiny_config("dots3_note", shared_experts_intermediate_size=40))


# --- activations, per-layer configs, frozen bias Parameters ----------------------------------
def _lfm2_moe_model():
    """LFM2-MoE, whose experts' act_fn is the function F.silu, not a module."""
    config = transformers.Lfm2MoeConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=6,
        num_experts_per_tok=2, num_dense_layers=0, max_position_embeddings=64,
        layer_types=["full_attention", "full_attention"])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.skipif(not hasattr(transformers, "Lfm2MoeConfig"),
                    reason=f"transformers {transformers.__version__} has no LFM2-MoE")
def test_experts_with_the_silu_function_run_on_dsv3():
    model = _lfm2_moe_model()
    assert model.model.layers[0].feed_forward.experts.act_fn is torch.nn.functional.silu
    ids = input_ids()
    want = model(ids).logits
    model.set_experts_implementation("dsv3")
    with DsvOpLog() as log:
        got = model(ids).logits
    assert log.ops, "the experts did not run on dsv3's ops"
    assert_close(got, want, "logits")


def test_per_layer_top_k_round_trips():
    """HunYuan-MoE-V1 with a list moe_topk: each layer's router reads its own top-k by
    layer index, which unpatch_moe passes back when it rebuilds the blocks."""
    model = tiny_model("hunyuan_v1_moe", moe_topk=[2, 3]).eval()
    ids = input_ids()
    want = model(ids).logits
    assert dt.patch_moe(model) == 2
    assert [layer.mlp.config.top_k for layer in decoder_layers(model)] == [2, 3]
    assert dt.unpatch_moe(model) == 2
    assert [layer.mlp.gate.top_k for layer in decoder_layers(model)] == [2, 3]
    assert_close(model(ids).logits, want, "logits after unpatch")


def test_per_layer_config_needs_the_layer_index():
    moe = dsv3.MoE(dsv3.MoEConfig(dim=32, **PLAIN_CONFIGS["hunyuan_v1_moe"]))
    config = tiny_config("hunyuan_v1_moe", moe_topk=[3, moe.config.top_k])
    with pytest.raises(ValueError, match=r"^layer_idx: building the HunYuan-MoE-V1 block .* "
                                         r"list moe_topk\), got None"):
        dt.to_module(moe, config)
    block = dt.to_module(moe, config, layer_idx=1)
    assert block.gate.top_k == moe.config.top_k
    with pytest.raises(ValueError, match=r"hf_config: .*top_k="):  # layer 0's top-k is 3
        dt.to_module(moe, config, layer_idx=0)


@pytest.mark.parametrize("arch", [arch_param("afmoe"), arch_param("laguna")])
def test_frozen_bias_parameter_stays_an_fp32_buffer(arch):
    """AFMoE's and Laguna's selection bias is a frozen nn.Parameter, which the patched
    block holds as a buffer: model.to(dtype) keeps it an fp32 buffer, not a parameter."""
    model = tiny_model(arch).eval()
    dt.patch_moe(model)
    block = sparse_block(model)
    for dtype in (torch.bfloat16, torch.float16):
        model.to(dtype)
        assert "expert_bias" in block._buffers and "expert_bias" not in block._parameters
        assert block.expert_bias.dtype == torch.float32
    assert not any(name.endswith("expert_bias") for name, _ in model.named_parameters())
