"""Patched models with the tools they are combined with: HF's Trainer (checkpoint and
resume, across patched and unpatched runs), gradient checkpointing, PEFT's LoRA and
accelerate's big-model dispatch. Each is compared with the unpatched model, or must
be refused with the reason: a patched block reads its router's and experts'
Parameters itself, so wrappers and hooks that act in those modules' forward (PEFT's
adapter layers, accelerate's offloading) would otherwise be silently bypassed."""
import os
import re
import warnings

import pytest
import torch

pytest.importorskip("transformers")  # only where it is not installed; CI has it

from conftest import assert_close
from hf_models import ARCHS, input_ids, sparse_block, tiny_model, transformers
from transformers_support import arch_param

import dsv3.integrations.transformers as dt
from dsv3.integrations.transformers.wrappers import offloading

# GraniteMoE-SWA: its checkpoints keep the fused expert keys (most families' are
# converted back to per-expert keys by save_pretrained, which a Trainer resume, through
# load_state_dict, cannot read, patched or not), and its block holds its router first.
RESUME_ARCH = "granitemoe_swa"


def _lora_grads(model) -> dict[str, torch.Tensor]:
    """The adapter's gradients, under names that a patched and an unpatched model share
    (the unpatched one wraps ``mlp.experts``, the patched one ``mlp`` itself)."""
    return {name.replace(".experts.", "."): p.grad for name, p in model.named_parameters()
            if "lora_" in name and p.grad is not None}


def _loss(model, ids=None):
    ids = input_ids() if ids is None else ids
    return model(ids).logits.float().pow(2).mean()


# --- parameter order (optimizer state dicts are keyed by it) -------------------------


@pytest.mark.parametrize("arch", [arch_param(a) for a in ARCHS])
def test_parameters_come_in_the_unpatched_order(arch):
    """Optimizer state dicts pair state with parameters by position: a patched model must
    list its trainable Parameters (the very same objects) in the unpatched model's order."""
    model = tiny_model(arch)
    want = [id(p) for p in model.parameters() if p.requires_grad]
    dt.patch_moe(model)
    assert [id(p) for p in model.parameters() if p.requires_grad] == want
    # Names stay dsv3's, and each module is still listed once.
    assert any(name.endswith(".router.weight") for name, _ in model.named_parameters())
    modules = list(model.modules())
    assert len(modules) == len({id(m) for m in modules})
    dt.unpatch_moe(model)
    assert [id(p) for p in model.parameters() if p.requires_grad] == want


# Families whose frozen selection bias is an nn.Parameter, held by the patched block
# as a buffer (README: build the optimizer over the trainable parameters there).
BIAS_PARAMETER_ARCHS = {"afmoe", "laguna", "ernie4_5_moe", "ernie4_5_moe_no_shared"}


@pytest.mark.parametrize("arch", [arch_param(a) for a in ARCHS])
def test_frozen_parameters_too_come_in_the_unpatched_order(arch):
    """An optimizer over every parameter (a plain AdamW(model.parameters())) counts the
    frozen ones. Where the patched model lacks one (the bias it holds as a buffer), the
    counts differ, so loading the other model's state refuses; it never pairs a
    moment with the wrong parameter."""
    model = tiny_model(arch)
    want = [id(p) for p in model.parameters()]
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    dt.patch_moe(model)
    got = [id(p) for p in model.parameters()]
    if arch not in BIAS_PARAMETER_ARCHS:
        assert got == want
        return
    lost = [i for i in want if i not in set(got)]
    assert lost and set(lost) <= frozen
    assert [i for i in want if i in set(got)] == [i for i in got if i in set(want)]
    unpatched = torch.optim.AdamW(tiny_model(arch).parameters())
    with pytest.raises(ValueError, match="size"):
        torch.optim.AdamW(model.parameters()).load_state_dict(unpatched.state_dict())


def test_optimizer_state_moves_between_patched_and_unpatched_models():
    """An Adam state saved with the unpatched model loads into the patched one (and
    back), each moment on the Parameter it was computed for."""
    unpatched = tiny_model("mixtral")
    optimizer = torch.optim.Adam(unpatched.parameters(), lr=1e-2)
    _loss(unpatched).backward()
    optimizer.step()
    patched = tiny_model("mixtral")
    dt.patch_moe(patched)
    moved = torch.optim.Adam(patched.parameters(), lr=1e-2)
    moved.load_state_dict(optimizer.state_dict())
    by_name = dict(unpatched.named_parameters())
    patched_names = {id(p): n for n, p in patched.named_parameters()}
    hf_name = {f"{prefix}{name}": f"{prefix}{hf}" for prefix in ("model.layers.0.mlp.",
                                                               "model.layers.1.mlp.")
               for name, hf, _, _ in sparse_block(patched).hf_keys}
    for param in patched.parameters():
        name = patched_names[id(param)]
        want = optimizer.state[by_name[hf_name.get(name, name)]]["exp_avg"]
        assert torch.equal(moved.state[param]["exp_avg"], want), name


class _Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        ids = torch.randint(0, 100, (9,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The state_dict after 4 uninterrupted unpatched steps (once for the module)."""
    return _train(False, str(tmp_path_factory.mktemp("straight")), 4)


def _train(patch: bool, out: str, steps: int, resume: str | None = None):
    """A Trainer run of ``steps`` AdamW steps, checkpointing every 2; returns the model's
    state_dict. (Not the default fused AdamW: given moments of other shapes, it read
    out of bounds, and a segfault would end the whole test run.)"""
    model = tiny_model(RESUME_ARCH)
    if patch:
        dt.patch_moe(model)
    args = transformers.TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
        save_steps=2, report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
        lr_scheduler_type="constant", logging_steps=100, optim="adamw_torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.Trainer(model=model, args=args, train_dataset=_Tokens()).train(
            resume_from_checkpoint=resume)
    return model.state_dict()


@pytest.mark.parametrize("first, second", [(False, True), (True, False), (True, True)],
                         ids=["unpatched-to-patched", "patched-to-unpatched", "patched"])
def test_trainer_resumes_across_patching(first, second, tmp_path, straight_run):
    """Train 2 steps, checkpoint, resume to 4 (patched or not on either side): the same
    weights as 4 uninterrupted unpatched steps. Before the patched model took the
    unpatched parameter order, the Adam moments went to the wrong Parameters (and fused
    AdamW on CPU read past their end)."""
    want = straight_run
    out = str(tmp_path / "resumed")
    _train(first, out, 2)
    got = _train(second, out, 4, resume=os.path.join(out, "checkpoint-2"))
    assert list(got) == list(want)
    for key in want:
        # Patched and unpatched steps differ in the last bits (about 3e-5 after 4 steps).
        torch.testing.assert_close(got[key], want[key], atol=2e-4, rtol=1e-3, msg=key)


# --- gradient checkpointing ---------------------------------------------------------


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_gradient_checkpointing_gradients_match(arch):
    grads = []
    for patch in (False, True):
        model = tiny_model(arch)
        if patch:
            dt.patch_moe(model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = input_ids()
        model(ids, labels=ids, output_router_logits=True).loss.backward()
        grads.append({k: v.grad for k, v in model.state_dict(keep_vars=True).items()
                      if isinstance(v, torch.nn.Parameter) and v.requires_grad})
    assert list(grads[1]) == list(grads[0])
    for key, want in grads[0].items():
        assert_close(grads[1][key], want, key)


# --- PEFT ---------------------------------------------------------------------------


def _lora(model, **config):
    peft = pytest.importorskip("peft")
    torch.manual_seed(5)  # the same adapter weights on each side
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                      **config))


@pytest.mark.parametrize("order", ["patch-then-lora", "lora-then-patch"])
def test_lora_on_attention(order):
    want_model = _lora(tiny_model("mixtral"), target_modules=["q_proj", "v_proj"])
    want = want_model(input_ids()).logits
    _loss(want_model).backward()
    model = tiny_model("mixtral")
    if order == "patch-then-lora":
        dt.patch_moe(model)
    model = _lora(model, target_modules=["q_proj", "v_proj"])
    if order == "lora-then-patch":
        assert dt.patch_moe(model) == 2
    assert_close(model(input_ids()).logits, want, "logits")
    _loss(model).backward()
    got, want_grads = _lora_grads(model), _lora_grads(want_model)
    assert list(got) == list(want_grads)
    for key in want_grads:
        assert_close(got[key], want_grads[key], key)


def test_lora_on_the_patched_experts_parameters(tmp_path):
    """target_parameters on a patched block's own gate_up_proj / down_proj: forward,
    adapter gradients and merge_and_unload as the unpatched model's LoRA on its
    experts'; unpatch_moe under the adapter is refused until it is merged."""
    want_model = _lora(tiny_model("mixtral"), target_modules=[],
                       target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    want = want_model(input_ids()).logits
    _loss(want_model).backward()
    model = tiny_model("mixtral")
    dt.patch_moe(model)
    model = _lora(model, target_modules=[], target_parameters=["gate_up_proj", "down_proj"])
    assert_close(model(input_ids()).logits, want, "logits")
    _loss(model).backward()
    got, want_grads = _lora_grads(model), _lora_grads(want_model)
    assert sorted(got) == sorted(want_grads) and len(got) == 8
    for key in want_grads:
        assert_close(got[key], want_grads[key], key)
    with pytest.raises(ValueError, match="merge_and_unload"):
        dt.unpatch_moe(model)
    merged = model.merge_and_unload()
    assert isinstance(sparse_block(merged), dt.TransformersMoE)
    assert_close(merged(input_ids()).logits, want, "merged logits")
    assert dt.unpatch_moe(merged) == 2  # a regular HF model again, the adapter merged
    assert_close(merged(input_ids()).logits, want, "unpatched merged logits")


def _shared_lora_name(name: str) -> str:
    """A LoRA Parameter's name as the unpatched model has it: the patched block's router
    sits under the block's own wrappers (``mlp.base_layer.base_layer.router``) where the
    unpatched one's is ``mlp.gate``, and its experts' adapters wrap ``mlp`` itself."""
    return re.sub(r"\.mlp\.(base_layer\.)*router\.", ".mlp.gate.", name).replace(".experts.", ".")


@pytest.mark.parametrize("arch", [arch_param(a) for a in ("mixtral", "qwen3_moe", "deepseek_v3")])
def test_all_linear_lora_on_a_patched_model(arch):
    """PEFT's target_modules="all-linear" on these models adapts the router and the
    experts too (PEFT 0.21 maps transformers v4's Linears onto v5's router weight and
    fused experts, for most listed architectures). On a patched model it wrapped the
    router, which the patched block refused at its forward; now the patched model
    computes what the unpatched one does, given the same adapter weights, and its
    adapters get the same gradients."""
    want_model = _lora(tiny_model(arch), target_modules="all-linear")
    model = tiny_model(arch)
    dt.patch_moe(model)
    model = _lora(model, target_modules="all-linear")
    want_lora = {n: p for n, p in want_model.named_parameters() if "lora_" in n}
    lora = {_shared_lora_name(n): p for n, p in model.named_parameters() if "lora_" in n}
    assert sorted(lora) == sorted(n.replace(".experts.", ".") for n in want_lora)
    assert any(".mlp.gate.lora_A" in name for name in lora)  # the router is adapted
    with torch.no_grad():  # drawn in another order: the unpatched model's values
        for name, value in want_lora.items():
            lora[name.replace(".experts.", ".")].copy_(value)
    assert_close(model(input_ids()).logits, want_model(input_ids()).logits, "logits")
    _loss(model).backward()
    _loss(want_model).backward()
    for name, value in want_lora.items():
        assert value.grad.abs().sum() > 0, name
        assert_close(lora[name.replace(".experts.", ".")].grad, value.grad, name)


def test_lora_on_the_patched_router():
    """LoRA on the patched router (an nn.Linear) acts as the unpatched model's LoRA on
    its router's weight: same logits, router_logits and adapter gradients. It was
    refused at the forward: the fused routing read router.weight."""
    want_model = _lora(tiny_model("mixtral"), target_modules=["gate"])
    model = tiny_model("mixtral")
    dt.patch_moe(model)
    model = _lora(model, target_modules=["router"])
    want = want_model(input_ids(), output_router_logits=True)
    got = model(input_ids(), output_router_logits=True)
    assert_close(got.logits, want.logits, "logits")
    for layer, (g, w) in enumerate(zip(got.router_logits, want.router_logits, strict=True)):
        assert_close(g.float(), w.float(), f"router_logits {layer}")
    _loss(model).backward()
    _loss(want_model).backward()
    got_grads, want_grads = _lora_grads(model), _lora_grads(want_model)
    assert [_shared_lora_name(k) for k in got_grads] == list(want_grads)
    for g, (key, w) in zip(got_grads.values(), want_grads.items()):
        assert g.abs().sum() > 0
        assert_close(g, w, key)


@pytest.mark.parametrize("config", [dict(target_modules=[], target_parameters=[
    "experts.gate_up_proj", "experts.down_proj"]), dict(target_modules=["gate"])],
    ids=["experts", "router"])
def test_patching_under_an_adapter_on_the_moe_is_refused(config):
    """LoRA on the HF experts' Parameters or the router, then patch_moe: refused with the
    reason (it named missing SwiGLU gates, or failed on the wrapper's attributes), and
    the model stays as it was."""
    model = _lora(tiny_model("mixtral"), **config)
    want = model(input_ids()).logits
    with pytest.raises(ValueError, match="adapter"):
        dt.patch_moe(model)
    assert not any(isinstance(m, dt.TransformersMoE) for m in model.modules())
    assert torch.equal(model(input_ids()).logits, want)


@pytest.mark.parametrize("order", ["patch-then-lora", "lora-then-patch"])
def test_lora_on_gpt_oss_experts_is_refused(order):
    """GPT-OSS's patched block reads its HF experts' Parameters itself; LoRA on them
    (PEFT's target_parameters) is refused with the reason, either way round (it failed
    on the wrapper's missing hidden_size, or was called unsupported experts)."""
    from test_transformers_gpt_oss import tiny_gpt_oss
    model = tiny_gpt_oss()
    config = dict(target_modules=[], target_parameters=["experts.gate_up_proj"])
    if order == "patch-then-lora":
        dt.patch_moe(model)
        model = _lora(model, **config)
        with pytest.raises(TypeError, match="GptOssMoE: its experts is wrapped by ParamWrapper"):
            model(input_ids())
    else:
        model = _lora(model, **config)
        with pytest.raises(ValueError, match=r"patch_moe: [\w.]*layers\.0\.mlp: its experts "
                                             r"is wrapped by ParamWrapper"):
            dt.patch_moe(model)
        assert not any(isinstance(m, dt.GptOssMoE) for m in model.modules())


# --- accelerate ---------------------------------------------------------------------


def _layer_map(offloaded: str) -> dict[str, str]:
    """A device_map keeping all but decoder layer 1 on the CPU; layer 1 offloaded."""
    return {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": offloaded,
            "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.mark.parametrize("order", ["patch-then-dispatch", "dispatch-then-patch"])
def test_dispatch_model_in_memory(order):
    accelerate = pytest.importorskip("accelerate")
    want = tiny_model("deepseek_v3").eval()(input_ids()).logits
    model = tiny_model("deepseek_v3").eval()
    if order == "patch-then-dispatch":
        dt.patch_moe(model)
    model = accelerate.dispatch_model(model, {"": "cpu"}, force_hooks=True)
    if order == "dispatch-then-patch":
        dt.patch_moe(model)
    assert isinstance(sparse_block(model), dt.TransformersMoE)
    assert_close(model(input_ids()).logits, want, "logits")


def test_from_pretrained_with_a_device_map_then_patch(tmp_path):
    pytest.importorskip("accelerate")
    model = tiny_model("qwen2_moe").eval()
    want = model(input_ids()).logits
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, device_map="cpu", experts_implementation="eager").eval()
    assert dt.patch_moe(loaded) == 2
    assert_close(loaded(input_ids()).logits, want, "logits")


def test_init_empty_weights_then_patch_then_load():
    accelerate = pytest.importorskip("accelerate")
    model = tiny_model("mixtral").eval()
    want = model(input_ids()).logits
    with accelerate.init_empty_weights():
        empty = transformers.AutoModelForCausalLM.from_config(model.config,
                                                              experts_implementation="eager")
    dt.patch_moe(empty)
    empty.load_state_dict(model.state_dict(), assign=True)
    assert_close(empty.eval()(input_ids()).logits, want, "logits")


def _offload(model, how: str, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    if how == "cpu_offload":
        return accelerate.cpu_offload(model, execution_device="cpu")
    if how == "preload":  # the block's hook also places (offloads) its children
        return accelerate.cpu_offload(model, execution_device="cpu",
                                      preload_module_classes=["TransformersMoE"])
    return accelerate.dispatch_model(model, _layer_map("disk"), offload_dir=str(tmp_path))


@pytest.mark.parametrize("how", ["cpu_offload", "disk", "preload"])
def test_offloading_a_patched_model_is_refused(how, tmp_path):
    """It failed at the first forward with a KeyError on a dsv3 name in accelerate's
    hook; now the offload itself is refused, and the block keeps its weights, its
    children's (router, shared expert) too: with preload_module_classes they were
    left on the meta device, and the model computed garbage."""
    model = tiny_model("qwen2_moe").eval()
    dt.patch_moe(model)
    block = sparse_block(model)
    want = {name: t.detach().clone() for name, t in block.state_dict().items()}
    whole = {name: t.detach().clone() for name, t in model.state_dict().items()}
    logits = model(input_ids()).logits
    with pytest.raises(RuntimeError, match="offload"):
        _offload(model, how, tmp_path)
    got = block.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert not got[name].is_meta and torch.equal(got[name], want[name]), name
    # ... and so do the modules accelerate offloaded before it reached the block (the
    # embeddings, the first layer's attention): their hooks kept them on the meta
    # device, and save_pretrained failed on "Cannot copy out of meta tensor"
    got = model.state_dict()
    for name in whole:
        assert not got[name].is_meta and torch.equal(got[name], whole[name]), name
    # (hooks that only align devices may stay: dsv3 cannot tell them from earlier ones)
    assert not any(offloading(getattr(m, "_hf_hook", None)) for m in model.modules())
    model.save_pretrained(tmp_path / "saved")
    assert torch.equal(model(input_ids()).logits, logits)


def test_a_refused_offload_keeps_the_hooks_the_model_had_before():
    """The rollback took back every offloading hook in the model, the user's own offload
    of the embeddings (attached before patch_moe) too; now only those attached since."""
    accelerate = pytest.importorskip("accelerate")
    model = tiny_model("qwen2_moe").eval()
    embeddings = model.get_input_embeddings()
    accelerate.cpu_offload(embeddings, execution_device="cpu")
    own_hook = embeddings._hf_hook
    dt.patch_moe(model)
    logits = model(input_ids()).logits
    with pytest.raises(RuntimeError, match="offload"):
        accelerate.cpu_offload(model.model.layers, execution_device="cpu")
    assert embeddings._hf_hook is own_hook
    assert not any(offloading(getattr(m, "_hf_hook", None))
                   for name, m in model.model.layers.named_modules())
    assert torch.equal(model(input_ids()).logits, logits)


def test_offloading_a_patched_gpt_oss_is_refused_at_its_forward():
    """GPT-OSS's patched block keeps the HF router and experts modules, on which
    cpu_offload puts its hooks; their forwards, which would load the weights, never run.
    It failed deep in the ops on meta tensors; now the block names the offload."""
    accelerate = pytest.importorskip("accelerate")
    from test_transformers_gpt_oss import tiny_gpt_oss
    model = tiny_gpt_oss().eval()
    dt.patch_moe(model)
    accelerate.cpu_offload(model, execution_device="cpu")
    with pytest.raises(RuntimeError, match=r"GptOssMoE: accelerate offloads its (router|experts)'s "
                                           r"weights \(cpu_offload"):
        model(input_ids())


@pytest.mark.parametrize("how", ["cpu_offload", "disk"])
def test_patching_an_offloaded_model_is_refused(how, tmp_path):
    """It patched, and failed at the forward on meta weights ("x must be on the layer's
    device meta"); now patch_moe refuses with the reason, and replaces nothing."""
    want = tiny_model("mixtral").eval()(input_ids()).logits
    model = _offload(tiny_model("mixtral").eval(), how, tmp_path)
    with pytest.raises(ValueError, match="offload"):
        dt.patch_moe(model)
    assert not any(isinstance(m, dt.TransformersMoE) for m in model.modules())
    assert torch.equal(model(input_ids()).logits, want)
