"""transformers' weight init on patched models: ``model.init_weights()`` and
``model.apply(model._init_weights)`` run on a patched model, and the from-scratch flow
(build on the meta device, patch_moe, to_empty, init_weights) initializes every tensor
of the patched blocks as transformers initializes the unpatched model's: the same
tensors drawn (normal with the config's std), zeroed (DeepSeek-V3's correction bias,
AFMoE's router and bias) or left alone. The values differ (the draws come in another
order), so the tests compare what each tensor holds by kind and spread."""
import pytest
import torch

pytest.importorskip("transformers")  # only where it is not installed; CI has it

from hf_models import input_ids, sparse_block, tiny_config, tiny_model, transformers
from transformers_support import arch_param

import dsv3.integrations.transformers as dt

# Mixtral: softmax router; Qwen2-MoE: gated shared expert; DeepSeek-V3: the router's
# e_score_correction_bias and plain shared experts; AFMoE: a router HF zeroes and the
# block's own bias; HunYuan-MoE-V1: the router weight at gate.wg.
INIT_ARCHS = ("mixtral", "qwen2_moe", "deepseek_v3", "afmoe", "hunyuan_v1_moe")
SENTINEL = 1e4  # what to_empty's memory is set to before init: any left shows


def _from_scratch(arch: str, patch: bool) -> dict[str, torch.Tensor]:
    """The state_dict of ``arch``'s model built on the meta device, (patched,)
    materialized and initialized by transformers."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch))
    if patch:
        assert dt.patch_moe(model) > 0
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.fill_(SENTINEL)
    torch.manual_seed(0)
    model.init_weights()
    if patch:  # it still runs as a patched model
        assert isinstance(sparse_block(model), dt.TransformersMoE)
        assert torch.isfinite(model(input_ids()).logits).all()
    return model.state_dict()


@pytest.mark.parametrize("arch", [arch_param(a) for a in INIT_ARCHS])
def test_from_scratch_init_matches_the_unpatched_model(arch):
    want, got = _from_scratch(arch, patch=False), _from_scratch(arch, patch=True)
    assert list(got) == list(want)
    moe_keys = [key for key in want if ".mlp." in key]
    assert any(key.endswith("experts.gate_up_proj") for key in moe_keys)
    for key in want:
        w, g = want[key].double(), got[key].double()
        assert (g == SENTINEL).any() == (w == SENTINEL).any(), f"{key}: left uninitialized"
        for value in (0.0, 1.0):  # zeroed or set to ones in the unpatched model: here too
            assert (w == value).all() <= (g == value).all(), f"{key}: not all {value}"
        if w.numel() >= 64 and not torch.equal(w, g):  # drawn: with the same spread
            assert g.std() == pytest.approx(w.std().item(), rel=0.3), f"{key}: std"
            assert g.mean().abs() < 3 * w.std() / w.numel() ** 0.5 + 1e-6, f"{key}: mean"


@pytest.mark.parametrize("arch", [arch_param(a) for a in ("mixtral", "qwen2_moe", "deepseek_v3")])
def test_init_weights_on_a_patched_model(arch):
    """init_weights() and apply(_init_weights) re-draw the patched blocks' weights (as
    they do the unpatched model's) and reach the experts and the router."""
    model = tiny_model(arch)
    dt.patch_moe(model)
    block = sparse_block(model)
    std = model.config.initializer_range
    for init in (lambda: model.apply(model._init_weights), model.init_weights):
        with torch.no_grad():
            for tensor in (block.gate_up_proj, block.down_proj, block.router.weight):
                tensor.fill_(SENTINEL)
            if block.expert_bias is not None:
                block.expert_bias.fill_(SENTINEL)
        for module in model.modules():  # init_weights skips modules already initialized
            module.__dict__.pop("_is_hf_initialized", None)
        init()
        for tensor in (block.gate_up_proj, block.down_proj):
            assert tensor.std().item() == pytest.approx(std, rel=0.2)
        assert not (block.router.weight == SENTINEL).any()
        if block.expert_bias is not None:  # DeepSeek-V3's e_score_correction_bias: zeroed
            assert (block.expert_bias == 0).all()
