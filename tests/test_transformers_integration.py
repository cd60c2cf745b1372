"""dsv3 under transformers models: experts_implementation="dsv3" and patch_moe give the
logits and every parameter gradient of the original model (fp32 tolerances of the
table in conftest, DESIGN.md section 4), generate the same tokens, keep
output_router_logits and the aux loss working, share the original Parameters, and
reject what they do not support with a message that says what is supported."""
import copy
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")  # only where it is not installed; CI has it

from conftest import assert_close, assert_close_to_reference
from hf_models import (ARCHS, GLM5_NEXT_SWIGLU_LIMIT, N_SPARSE, decoder_layers, input_ids,
                       missing, tiny_config, tiny_model, transformers)

import dsv3
import dsv3.integrations.transformers as dt

ROUTES = ("experts_implementation", "patch_moe")
# Every family runs on the CPU. On a GPU, whose minutes are few, one family of each
# kind of router and shared expert (the ops they call are the same): softmax, gated
# shared expert, sigmoid + groups + plain shared experts, the block's own bias.
GPU_ARCHS = ("mixtral", "qwen2_moe", "deepseek_v3", "afmoe")


def _arch(arch: str, *values, marks=()):
    """One arch's parameter set; skipped where this transformers lacks the family."""
    reason = missing(arch)
    skip = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(arch, *values, marks=[*marks, *skip])


ARCH_PARAMS = [_arch(arch) for arch in ARCHS]
ARCH_DEVICES = [_arch(arch, "cpu") for arch in ARCHS] + [
    _arch(arch, "cuda", marks=[pytest.mark.gpu]) for arch in GPU_ARCHS]
ROOT = Path(__file__).resolve().parents[1]


class _DsvOpLog(TorchDispatchMode):
    """Records which dsv3:: ops ran, so a test fails if a route silently fell back
    to transformers' own code (the logits would still match)."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "dsv3":
            self.ops.add(func._opname)
        return func(*args, **(kwargs or {}))


def _apply(model, route: str) -> None:
    if route == "experts_implementation":
        model.set_experts_implementation("dsv3")
    else:
        assert dt.patch_moe(model) == N_SPARSE[model.config.model_type]


def _loss_logits_grads(model, ids):
    """(loss, logits, {parameter: grad}) of one training step; grads keyed by the
    Parameter object itself, which both routes keep."""
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {p: p.grad.clone() for p in model.parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("arch", "device"), ARCH_DEVICES)
def test_same_logits_and_grads(arch, route, device):
    model = tiny_model(arch).to(device)
    ids = input_ids().to(device)
    want_loss, want_logits, want_grads = _loss_logits_grads(model, ids)
    _apply(model, route)
    with _DsvOpLog() as log:
        loss, logits, grads = _loss_logits_grads(model, ids)
    # Routing is fused only by patch_moe; the experts run on dsv3 in both routes.
    assert {"grouped_mm_gather", "grouped_mm", "swiglu", "unpermute"} <= log.ops
    assert ("route" in log.ops) == (route == "patch_moe")
    assert_close(logits, want_logits, "logits")
    assert_close(loss, want_loss, "loss")
    assert set(grads) == set(want_grads), "the set of parameters with a gradient changed"
    for param, want in want_grads.items():
        assert_close(grads[param], want, f"grad of a {tuple(param.shape)} parameter")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_generate_matches(arch, route):
    model = tiny_model(arch).eval()
    prompt = input_ids(batch=2, seq=5)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = model.generate(prompt, **settings)
    _apply(model, route)
    got = model.generate(prompt, **settings)
    assert torch.equal(got, want)


def _large_aux_loss(model):
    """Aux loss coefficient 0.5, so that a missing aux loss shows in the loss. Causal LMs
    copy it from the config when built; the vision-language models read their text
    config's at each forward."""
    model.config.get_text_config().router_aux_loss_coef = 0.5
    if hasattr(model, "router_aux_loss_coef"):
        model.router_aux_loss_coef = 0.5
    return model


@pytest.mark.parametrize("hooks_before_patch", [False, True],
                         ids=["hooks_after", "hooks_moved"])  # router_logits asked first?
# The ones whose models compute an aux loss (its router_logits are what the loss reads).
@pytest.mark.parametrize("arch", [_arch(a) for a in (
    "mixtral", "qwen2_moe", "minimax", "olmoe", "flex_olmo", "qwen3_next", "qwen3_5_moe_text",
    "minimax_m2", "qwen3_vl_moe", "glm4v_moe", "glm5_next")])
def test_router_logits_and_aux_loss(arch, hooks_before_patch):
    model = _large_aux_loss(tiny_model(arch))
    ids = input_ids()
    want = model(ids, labels=ids, output_router_logits=True)
    if not hooks_before_patch:  # a fresh model: transformers installs its hooks lazily
        model = _large_aux_loss(tiny_model(arch))
    dt.patch_moe(model)
    got = model(ids, labels=ids, output_router_logits=True)
    assert len(got.router_logits) == len(want.router_logits) == N_SPARSE[arch]
    for layer, (g, w) in enumerate(zip(got.router_logits, want.router_logits)):
        assert_close(g, w.float(), f"router_logits of layer {layer}")
    assert_close(got.aux_loss, want.aux_loss, "aux_loss")
    assert_close(got.loss, want.loss, "loss")


def _hf_tensors(block):
    """The HF block's parameters and buffers by name, before any conversion."""
    return {**dict(block.named_parameters()), **dict(block.named_buffers())}


# Where the HF blocks keep their router weight and selection bias, where not in
# block.gate.weight / nowhere (written out here, not read from dsv3's own tables).
ROUTER_WEIGHT = {"hunyuan_v1_moe": "gate.wg.weight", "afmoe": "router.gate.weight"}
SELECTION_BIAS = {arch: "gate.e_score_correction_bias" for arch in
                  ("deepseek_v3", "glm4_moe", "glm4_moe_lite", "dots1", "exaone_moe",
                   "solar_open", "deepseek_v32", "glm_moe_dsa", "glm4v_moe", "glm5_next")}
SELECTION_BIAS |= {"minimax_m2": "e_score_correction_bias", "afmoe": "expert_bias"}


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_converters_share_parameters(arch):
    model = tiny_model(arch)
    block = decoder_layers(model)[1].mlp
    before = _hf_tensors(block)
    moe = dt.from_module(block)
    assert isinstance(moe, dsv3.MoE)
    assert moe.gate_up_proj is block.experts.gate_up_proj
    assert moe.down_proj.data_ptr() == block.experts.down_proj.data_ptr()
    assert moe.router.weight is before[ROUTER_WEIGHT.get(arch, "gate.weight")]
    dsv3_ptrs = {t.data_ptr() for t in [*moe.parameters(), *moe.buffers()]}
    assert {t.data_ptr() for t in before.values()} <= dsv3_ptrs, "some HF tensor was copied"
    if arch in SELECTION_BIAS:
        assert moe.expert_bias is before[SELECTION_BIAS[arch]]
    else:
        assert moe.expert_bias is None

    back = dt.to_module(moe)
    assert type(back) is type(block)
    after = _hf_tensors(back)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name] is tensor, f"{name} is not the original tensor after the round trip"

    x = torch.randn(3, 5, 32)
    assert_close(moe(x), block(x), "from_module output")
    assert_close(back(x), block(x), "to_module output")


def test_unpatch_restores_the_model():
    model = tiny_model("qwen2_moe")
    ids = input_ids()
    want = model(ids).logits
    keys = model.state_dict().keys()
    dt.patch_moe(model)
    assert dt.patch_moe(model) == 0  # already patched: nothing left to replace
    assert "model.layers.0.mlp.gate_up_proj" in model.state_dict()  # dsv3 names meanwhile
    assert dt.unpatch_moe(model) == 2
    assert model.state_dict().keys() == keys
    assert_close(model(ids).logits, want, "logits after unpatch")


# bias_update_rate gives a dsv3.MoE its expert_bias buffer.
PLAIN_CONFIGS = {
    "mixtral": dict(ffn_dim=48, n_experts=4, top_k=2),
    "deepseek_v3": dict(ffn_dim=24, n_experts=8, top_k=3, n_shared_experts=1, score="sigmoid",
                        n_groups=4, topk_groups=2, route_scale=2.5, bias_update_rate=1e-3),
    "hunyuan_v1_moe": dict(ffn_dim=24, n_experts=6, top_k=2, n_shared_experts=1),
    "afmoe": dict(ffn_dim=24, n_experts=6, top_k=2, n_shared_experts=2, score="sigmoid",
                  route_scale=2.0, bias_update_rate=1e-3),
    # Vision-language models: their whole config (its text_config picks the block).
    "qwen3_vl_moe": dict(ffn_dim=24, n_experts=6, top_k=2),
    "glm4v_moe": dict(ffn_dim=24, n_experts=8, top_k=3, n_shared_experts=1, score="sigmoid",
                      n_groups=4, topk_groups=2, route_scale=2.5, bias_update_rate=1e-3),
    "deepseek_v2": dict(ffn_dim=24, n_experts=8, top_k=3, n_shared_experts=2, route_scale=1.5,
                        normalize_weights=False),
    # group_limited_greedy: groups scored by their best expert.
    "deepseek_v2_group_limited": dict(ffn_dim=24, n_experts=8, top_k=3, n_shared_experts=2,
                                      route_scale=1.5, normalize_weights=False, n_groups=4,
                                      topk_groups=2, group_score="max"),
    "cohere2_moe": dict(ffn_dim=24, n_experts=6, top_k=2, n_shared_experts=2),
    # The clamped SwiGLU, in the routed and the (split) shared experts alike.
    "glm5_next": dict(ffn_dim=24, n_experts=8, top_k=3, n_shared_experts=1, score="sigmoid",
                      n_groups=4, topk_groups=2, route_scale=2.5, bias_update_rate=1e-3,
                      swiglu_limit=GLM5_NEXT_SWIGLU_LIMIT),
}


@pytest.mark.parametrize("arch", [_arch(a) for a in PLAIN_CONFIGS])
def test_plain_moe_to_module(arch):
    """A dsv3.MoE trained on its own becomes an HF block (shared experts: the fused
    expert is split, a copy; everything else is the same Parameters). HunYuan and AFMoE
    keep their router weight, bias and shared MLP under other names."""
    moe = dsv3.MoE(dsv3.MoEConfig(dim=32, **PLAIN_CONFIGS[arch]))
    if moe.expert_bias is not None:  # as if trained: it changes some choices
        moe.expert_bias.copy_(0.1 * torch.randn(moe.config.n_experts))
    block = dt.to_module(moe, tiny_config(arch))
    tensors = _hf_tensors(block)
    assert block.experts.gate_up_proj is moe.gate_up_proj
    assert tensors[ROUTER_WEIGHT.get(arch, "gate.weight")] is moe.router.weight
    if arch in SELECTION_BIAS:
        bias = tensors[SELECTION_BIAS[arch]]
        assert bias.data_ptr() == moe.expert_bias.data_ptr()
        assert not bias.requires_grad
    x = torch.randn(2, 7, 32)
    assert_close(block(x), moe(x), "HF block output")


@pytest.mark.skipif(not hasattr(transformers, "SarvamMoEConfig"),
                    reason=f"transformers {transformers.__version__} has no Sarvam-MoE")
def test_patched_model_of_another_model_type_round_trips():
    """Sarvam-MoE's models are GLM-4-MoE's classes under their own model_type: patched
    and unpatched like GLM-4-MoE, and its config picks GLM-4-MoE's block in to_module."""
    glm = tiny_config("glm4_moe")
    config = transformers.SarvamMoEConfig(**{k: getattr(glm, k) for k in (
        "intermediate_size", "moe_intermediate_size", "n_routed_experts", "n_group", "topk_group",
        "num_experts_per_tok", "n_shared_experts", "first_k_dense_replace",
        "routed_scaling_factor", "norm_topk_prob", "head_dim", "vocab_size", "hidden_size",
        "num_hidden_layers", "num_attention_heads", "num_key_value_heads")})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).train()
    ids = input_ids()
    want_loss, want_logits, want_grads = _loss_logits_grads(model, ids)
    assert dt.patch_moe(model) == 2
    loss, logits, grads = _loss_logits_grads(model, ids)
    assert_close(logits, want_logits, "logits")
    for param, want in want_grads.items():
        assert_close(grads[param], want, f"grad of a {tuple(param.shape)} parameter")
    assert dt.unpatch_moe(model) == 2
    assert_close(model(ids).logits, want_logits, "logits after unpatch")
    moe = dsv3.MoE(dsv3.MoEConfig(dim=32, ffn_dim=24, n_experts=8, top_k=3, n_shared_experts=2,
                                  score="sigmoid", n_groups=2, route_scale=1.5,
                                  normalize_weights=False))
    assert type(dt.to_module(moe, config)).__name__ == "Glm4MoeMoE"


@pytest.mark.skipif(not hasattr(transformers, "GlmgaConfig"),
                    reason=f"transformers {transformers.__version__} has no GLM-GA")
def test_glmga_with_a_moe_language_model():
    """GLM-GA's models are GLM-4.6V's, whose language model is whatever its text config
    builds: with GLM-4V-MoE's text config, GLM-4V-MoE's blocks, patched as such."""
    glm4v_moe = tiny_config("glm4v_moe")
    config = transformers.GlmgaConfig(text_config=glm4v_moe.text_config.to_dict(),
                                      vision_config=glm4v_moe.vision_config.to_dict())
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config).train()
    ids = input_ids()
    want_loss, want_logits, want_grads = _loss_logits_grads(model, ids)
    assert dt.patch_moe(model) == N_SPARSE["glm4v_moe"]
    loss, logits, grads = _loss_logits_grads(model, ids)
    assert_close(logits, want_logits, "logits")
    assert_close(loss, want_loss, "loss")
    for param, want in want_grads.items():
        assert_close(grads[param], want, f"grad of a {tuple(param.shape)} parameter")
    moe = dsv3.MoE(dsv3.MoEConfig(dim=32, **PLAIN_CONFIGS["glm4v_moe"]))
    assert type(dt.to_module(moe, config)).__name__ == "Glm4vMoeTextMoE"


def test_plain_moe_to_module_checks_the_config():
    moe = dsv3.MoE(dsv3.MoEConfig(dim=32, ffn_dim=48, n_experts=4, top_k=1))
    with pytest.raises(ValueError, match=r"hf_config: .*top_k=1 vs 2"):
        dt.to_module(moe, tiny_config("mixtral"))
    with pytest.raises(ValueError, match="hf_config: required"):
        dt.to_module(moe)
    with pytest.raises(ValueError, match=r"model_type 'llama' is not supported.*Mixtral"):
        dt.to_module(moe, transformers.LlamaConfig())


def test_from_pretrained_with_dsv3_experts(tmp_path):
    model = tiny_model("qwen3_moe").eval()
    ids = input_ids()
    want = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path,
                                                               experts_implementation="dsv3")
    assert loaded.config._experts_implementation == "dsv3"
    with _DsvOpLog() as log:
        got = loaded(ids).logits
    assert "grouped_mm" in log.ops
    assert_close(got, want, "logits")


def test_import_dsv3_leaves_transformers_alone():
    """transformers is optional: importing dsv3 (and dsv3.integrations) must not load it;
    importing dsv3.integrations.transformers registers "dsv3" with it."""
    code = ("import sys, dsv3, dsv3.integrations; assert 'transformers' not in sys.modules; "
            "import dsv3.integrations.transformers; "
            "from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS; "
            "print('dsv3' in ALL_EXPERTS_FUNCTIONS)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "True"


# --- bad input ------------------------------------------------------------------------------
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


# Modes of a listed architecture that dsv3.MoE does not compute: (config overrides, the
# refused setting and the start of the reason, as the message says them).
REFUSED_MODES = [
    # top_k=3 of the one kept group's 2 experts: transformers adds another group's.
    _arch("deepseek_v2", dict(topk_method="group_limited_greedy", topk_group=1),
          "DeepSeek-V2 with topk_method='group_limited_greedy' (n_group=4, topk_group=1) "
          "with top_k=3", "top_k is above the kept groups' experts"),
    _arch("cohere2_moe", dict(expert_selection_fn="sigmoid"),
          "Cohere2-MoE with expert_selection_fn='sigmoid'",
          "it picks the top-k logits, dsv3.MoE the top-k scores"),
    _arch("cohere2_moe", dict(shared_expert_combination_strategy="average"),
          "Cohere2-MoE with shared_expert_combination_strategy='average'",
          r"it returns \(routed \+ shared\) / 2, dsv3.MoE routed \+ shared"),
]


@pytest.mark.parametrize(("arch", "overrides", "setting", "why"), REFUSED_MODES)
def test_refused_modes_say_why(arch, overrides, setting, why):
    """patch_moe raises the reason and replaces nothing (not even a block it could take);
    from_module and to_module refuse the same way."""
    model = tiny_model(arch, **overrides)
    ids = input_ids()
    want = model(ids).logits
    message = rf"{re.escape(setting)} cannot become a dsv3.MoE: {why}"
    with pytest.raises(ValueError, match=rf"^block: {message}"):
        dt.patch_moe(model)
    assert not any(isinstance(m, dt.TransformersMoE) for m in model.modules())
    assert_close(model(ids).logits, want, "logits after the refusal")
    with pytest.raises(ValueError, match=rf"^block: {message}"):
        dt.from_module(decoder_layers(model)[1].mlp)
    moe = dsv3.MoE(dsv3.MoEConfig(dim=32, **PLAIN_CONFIGS[arch]))
    with pytest.raises(ValueError, match=rf"^hf_config: {message}"):
        dt.to_module(moe, tiny_config(arch, **overrides))


def test_patched_model_saves_whole_with_torch_save(tmp_path):
    """torch.save(model) pickles the router-logits tap, a class made at run time (before:
    PicklingError); the loaded model computes the same logits and router_logits."""
    model = tiny_model("mixtral")
    dt.patch_moe(model)
    ids = input_ids()
    # Saved before any output_router_logits call: transformers' recording hooks are
    # closures, which pickle refuses in any model (patched or not).
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    want = model(ids, output_router_logits=True)
    got = loaded(ids, output_router_logits=True)
    assert_close(got.logits, want.logits, "logits after torch.load")
    for g, w in zip(got.router_logits, want.router_logits, strict=True):
        assert_close(g, w, "router_logits after torch.load")


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
    _arch("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=2, topk_group=2)),
    # Groups by their best expert (group_score="max"): 1 of 2 groups of 4; 3 of 8 groups
    # of 1 (the best is the only one); 3 of 4 groups of 2, top_k = all the kept experts.
    _arch("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=2, topk_group=1)),
    _arch("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=8, topk_group=3)),
    _arch("deepseek_v2", dict(topk_method="group_limited_greedy", topk_group=3,
                              num_experts_per_tok=6)),
    # No shared experts: nothing to average.
    _arch("cohere2_moe", dict(shared_expert_combination_strategy="average",
                              num_shared_experts=0)),
    # norm_topk_prob is read for sigmoid only.
    _arch("cohere2_moe", dict(norm_topk_prob=False)),
]


@pytest.mark.parametrize(("arch", "overrides"), ACCEPTED_MODES)
def test_accepted_modes_next_to_refused_ones(arch, overrides):
    block = decoder_layers(tiny_model(arch, **overrides))[1].mlp
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


def test_non_swiglu_experts_are_refused():
    config = tiny_config("mixtral")
    config.hidden_act = "gelu"
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"block: .* cannot become a dsv3.MoE: its activation "
                                         r"is GELUActivation, not SiLU"):
        dt.patch_moe(model)
    model.set_experts_implementation("dsv3")
    with pytest.raises(NotImplementedError, match=r'experts_implementation="dsv3" cannot run '
                                                  r"MixtralExperts: its activation is GELU"):
        model(input_ids())


def _block_step(block, x, params):
    """Output of ``block`` and the grads of x and ``params`` for a fixed upstream grad."""
    x = x.detach().clone().requires_grad_()
    out = block(x)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2),
                           dtype=torch.float64).to(out)
    return [out.detach(), *torch.autograd.grad(out, [x, *params], grad_out)]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("arch", "device"), ARCH_DEVICES)
def test_bf16_block_error_within_plain_pytorch(arch, route, device):
    """bf16 (DESIGN.md section 4), one MoE block: the error of the dsv3 block against
    the same block in fp64 is at most 2x the stock bf16 block's, plus a small floor;
    output and every gradient. (Whole bf16 models are not compared: one near-tie
    routed differently in layer 1 changes the logits far more than any kernel error.)"""
    hf_bf16 = decoder_layers(tiny_model(arch).bfloat16())[1].mlp.to(device)
    hf_fp64 = copy.deepcopy(hf_bf16).double()  # the same bf16-rounded weights, upcast
    ours = copy.deepcopy(hf_bf16)
    runs = {}
    for name, block in (("fp64", hf_fp64), ("plain", hf_bf16), ("dsv3", ours)):
        # The HF order; from_module keeps these objects. (AFMoE's bias is a frozen Parameter.)
        params = [p for p in block.parameters() if p.requires_grad]
        if name == "dsv3" and route == "patch_moe":
            block = dt.from_module(block)
        elif name == "dsv3":
            block.experts.config = copy.copy(block.experts.config)
            block.experts.config._experts_implementation = "dsv3"
        x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        x = x.to(device)
        with _DsvOpLog() as log:
            runs[name] = _block_step(block, x.to(params[0].dtype), params)
        assert ("grouped_mm" in log.ops) == (name == "dsv3")
    what = ["output", "grad of x"] + [f"grad of {n}" for n, p in hf_bf16.named_parameters()
                                      if p.requires_grad]
    for got, plain, ref, name in zip(runs["dsv3"], runs["plain"], runs["fp64"], what, strict=True):
        assert_close_to_reference(got, ref, plain, name)


def test_mixtral_router_jitter_matches():
    """Training-time jitter: the same multiplicative noise from the same RNG state."""
    block = tiny_model("mixtral").model.layers[0].mlp
    block.jitter_noise = 0.3
    moe = dt.from_module(block)
    x = torch.randn(2, 5, 32)
    torch.manual_seed(7)
    want = block(x.clone())  # HF scales its input in place
    torch.manual_seed(7)
    got = moe(x)
    assert_close(got, want, "output with jitter")
    assert not torch.equal(got, moe.eval()(x)), "jitter had no effect"


# --- the clamped SwiGLU (GLM-5-Next, DeepSeek-V4) -------------------------------------------
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
    """A lone clamped-SwiGLU experts module (GLM-5-Next's or DeepSeek-V4's), random
    weights of std 0.3: with x ~ N(0, 1), gate and up have std 1.7."""
    if arch == "glm5_next":
        from transformers.models.glm5_next import modeling_glm5_next as m
        config = tiny_config("glm5_next").text_config
        config.swiglu_limit = limit
        experts = m.Glm5NextTextExperts(config)
    else:
        from transformers.models.deepseek_v4 import modeling_deepseek_v4 as m
        config = transformers.DeepseekV4Config(hidden_size=32, moe_intermediate_size=24,
                                               n_routed_experts=6, swiglu_limit=limit)
        experts = m.DeepseekV4Experts(config)
    with torch.no_grad():
        for weight in (experts.gate_up_proj, experts.down_proj):
            weight.normal_(0, 0.3)
    return experts


@pytest.mark.parametrize("arch", [_arch("glm5_next"), _arch("deepseek_v4")])
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
        with _DsvOpLog() as log:
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
