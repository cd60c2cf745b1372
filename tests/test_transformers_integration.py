"""dsv3 under transformers models, numerically: experts_implementation="dsv3" and
patch_moe give the logits and every parameter gradient of the original model (fp32
tolerances of the table in conftest; bf16 blocks within plain
PyTorch's error), generate the same tokens, keep output_router_logits, the aux loss and
the router jitter working, share the original Parameters, round-trip through
from_module / to_module / unpatch_moe, from_pretrained and torch.save, and leave
transformers unimported until asked. What dsv3 refuses or accepts per architecture
mode (and the clamped SwiGLU) is in test_transformers_modes.py. This file holds the
CUDA cases: benchmarks/gpu_check.sh runs it."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")  # only where it is not installed; CI has it

from conftest import assert_close, assert_close_to_reference
from hf_models import (ARCHS, ERNIE, ERNIE_BIAS, GRANITE, N_SPARSE, TALKER, input_ids,
                       router_logits_missing, sparse_block, tiny_config, tiny_model,
                       transformers)
from transformers_support import PLAIN_CONFIGS, DsvOpLog, arch_param

import dsv3
import dsv3.integrations.transformers as dt

ROUTES = ("experts_implementation", "patch_moe")
# Every family runs on the CPU. On a GPU, whose minutes are few, one family of each
# kind of router and shared expert (the ops they call are the same): softmax, gated
# shared expert, sigmoid + groups + plain shared experts, the block's own bias.
GPU_ARCHS = ("mixtral", "qwen2_moe", "deepseek_v3", "afmoe")
ARCH_PARAMS = [arch_param(arch) for arch in ARCHS]
ARCH_DEVICES = [arch_param(arch, "cpu") for arch in ARCHS] + [
    arch_param(arch, "cuda", marks=[pytest.mark.gpu]) for arch in GPU_ARCHS]
ROOT = Path(__file__).resolve().parents[1]


def _apply(model, arch: str, route: str) -> None:
    if route == "experts_implementation":
        model.set_experts_implementation("dsv3")
    else:
        assert dt.patch_moe(model) == N_SPARSE[arch]


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
    _apply(model, arch, route)
    with DsvOpLog() as log:
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
    _apply(model, arch, route)
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
@pytest.mark.parametrize("arch", [arch_param(a, why=router_logits_missing) for a in (
    "mixtral", "qwen2_moe", "minimax", "olmoe", "flex_olmo", "qwen3_next", "qwen3_5_moe_text",
    "minimax_m2", "qwen3_vl_moe", "glm4v_moe", "glm5_next", "ernie4_5_moe",
    "qwen3_omni_moe_thinker", "jamba", *GRANITE, "laguna", "mellum", "flint", "lara_mini",
    TALKER, "qwen4_exp_text")])
def test_router_logits_and_aux_loss(arch, hooks_before_patch):
    model = _large_aux_loss(tiny_model(arch))
    ids = input_ids()
    want = model(ids, labels=ids, output_router_logits=True)
    if not hooks_before_patch:  # a fresh model: transformers installs its hooks lazily
        model = _large_aux_loss(tiny_model(arch))
    dt.patch_moe(model)
    got = model(ids, labels=ids, output_router_logits=True)
    if arch == TALKER:  # it returns only the aux loss it computes from the router_logits
        assert got.router_logits is want.router_logits is None
    else:
        assert len(got.router_logits) == len(want.router_logits) == N_SPARSE[arch]
    for layer, (g, w) in enumerate(zip(got.router_logits or (), want.router_logits or ())):
        assert_close(g, w.float(), f"router_logits of layer {layer}")
    assert want.aux_loss > 0
    assert_close(got.aux_loss, want.aux_loss, "aux_loss")
    assert_close(got.loss, want.loss, "loss")


def _hf_tensors(block):
    """The HF block's parameters and buffers by name, before any conversion."""
    return {**dict(block.named_parameters()), **dict(block.named_buffers())}


# Where the HF blocks keep their router weight and selection bias, where not in
# block.gate.weight / nowhere (written out here, not read from dsv3's own tables).
ROUTER_WEIGHT = {"hunyuan_v1_moe": "gate.wg.weight", "afmoe": "router.gate.weight",
                 "jamba": "router.weight"} | {arch: "router.weight" for arch in GRANITE}
SELECTION_BIAS = {arch: "gate.e_score_correction_bias" for arch in
                  ("deepseek_v3", "glm4_moe", "glm4_moe_lite", "dots1", "exaone_moe",
                   "solar_open", "deepseek_v32", "glm_moe_dsa", "glm4v_moe", "glm5_next",
                   "kimi_linear", "bailing_hybrid", "mimo_v2_flash", "laguna", "axk2",
                   "dots3_note", "hy_v4", "hy_v4_vl")}
SELECTION_BIAS |= {"minimax_m2": "e_score_correction_bias", "afmoe": "expert_bias",
                   "hy_v3": "e_score_correction_bias"}
# ERNIE-4.5-MoE's is a [1, E] Parameter, which dsv3 routes on through an [E] view.
SELECTION_BIAS |= {arch: "gate.moe_statics.e_score_correction_bias" for arch in ERNIE}


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_converters_share_parameters(arch):
    model = tiny_model(arch)
    block = sparse_block(model)
    before = _hf_tensors(block)
    moe = dt.from_module(block)
    assert isinstance(moe, dsv3.MoE)
    assert moe.gate_up_proj is block.experts.gate_up_proj
    assert moe.down_proj.data_ptr() == block.experts.down_proj.data_ptr()
    assert moe.router.weight is before[ROUTER_WEIGHT.get(arch, "gate.weight")]
    dsv3_ptrs = {t.data_ptr() for t in [*moe.parameters(), *moe.buffers()]}
    assert {t.data_ptr() for t in before.values()} <= dsv3_ptrs, "some HF tensor was copied"
    if arch in ERNIE:  # a view of the very Parameter
        bias = before[SELECTION_BIAS[arch]]
        assert moe.expert_bias._base is bias and moe.expert_bias.shape == (bias.numel(),)
    elif arch in SELECTION_BIAS:
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
    assert list(model.state_dict()) == list(keys)  # the HF names meanwhile too
    assert dt.unpatch_moe(model) == 2
    assert model.state_dict().keys() == keys
    assert_close(model(ids).logits, want, "logits after unpatch")


@pytest.mark.parametrize("arch", [arch_param(a) for a in PLAIN_CONFIGS])
def test_plain_moe_to_module(arch):
    """A dsv3.MoE trained on its own becomes an HF block (shared experts: the fused
    expert is split, a copy; everything else is the same Parameters). HunYuan, AFMoE and
    ERNIE-4.5-MoE keep their router weight, bias and shared MLP under other names (ERNIE's
    bias a [1, E] Parameter on the same storage)."""
    moe = dsv3.MoE(dsv3.MoEConfig(dim=32, **PLAIN_CONFIGS[arch]))
    if arch in ERNIE:  # one whose range keeps the sum above moe_norm_min
        moe.expert_bias.copy_(torch.tensor(ERNIE_BIAS))
    elif moe.expert_bias is not None:  # as if trained: it changes some choices
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


def test_to_module_refuses_routing_the_block_has_no_place_for():
    """Before: a capacity (copies past it dropped) and a learned selection bias were
    left out of a Mixtral block without a word, and the block computed otherwise."""
    capped = dsv3.MoE(dsv3.MoEConfig(dim=32, **PLAIN_CONFIGS["mixtral"], capacity_factor=0.5))
    with pytest.raises(ValueError, match=r"^moe: capacity_factor=0.5: a .* block has no "
                                         r"capacity"):
        dt.to_module(capped, tiny_config("mixtral"))
    biased = dsv3.MoE(dsv3.MoEConfig(dim=32, **PLAIN_CONFIGS["mixtral"], bias_update_rate=1e-3))
    dt.to_module(biased, tiny_config("mixtral"))  # a zero bias changes no choice
    biased.expert_bias.copy_(0.1 * torch.randn(biased.config.n_experts))
    with pytest.raises(ValueError, match=r"^moe: its expert_bias .* is non-zero, and a .* "
                                         r"block chooses experts without one"):
        dt.to_module(biased, tiny_config("mixtral"))


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


def test_from_pretrained_with_dsv3_experts(tmp_path):
    model = tiny_model("qwen3_moe").eval()
    ids = input_ids()
    want = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path,
                                                               experts_implementation="dsv3")
    assert loaded.config._experts_implementation == "dsv3"
    with DsvOpLog() as log:
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


def _block_step(block, x, params):
    """Output of ``block`` and the grads of x and ``params`` for a fixed upstream grad."""
    x = x.detach().clone().requires_grad_()
    out = block(x)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2),
                           dtype=torch.float64).to(out)
    return [out.detach(), *torch.autograd.grad(out, [x, *params], grad_out)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_empty_batch_like_transformers(arch, route, dtype):
    """No tokens ([2, 0, D]): transformers' blocks return an empty output (some attached
    to the graph, some not); so must the patched ones (dsv3.MoE refused an empty batch
    before)."""
    outputs = []
    for patched in (False, True):
        model = tiny_model(arch).to(dtype)
        if patched:
            _apply(model, arch, route)
        x = torch.randn(2, 0, model.config.get_text_config().hidden_size, dtype=dtype,
                        requires_grad=True)
        out = sparse_block(model)(x)
        out = out[0] if isinstance(out, tuple) else out
        outputs.append((out.shape, out.dtype))
        if patched and out.requires_grad:
            out.sum().backward()
            assert x.grad.shape == x.shape
    assert outputs[1] == outputs[0]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("arch", "device"), ARCH_DEVICES)
def test_bf16_block_error_within_plain_pytorch(arch, route, device):
    """bf16 (conftest's rule), one MoE block: the error of the dsv3 block against
    the same block in fp64 is at most 2x the stock bf16 block's, plus a small floor;
    output and every gradient. (Whole bf16 models are not compared: one near-tie
    routed differently in layer 1 changes the logits far more than any kernel error.)"""
    hf_bf16 = sparse_block(tiny_model(arch).bfloat16()).to(device)
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
        with DsvOpLog() as log:
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
