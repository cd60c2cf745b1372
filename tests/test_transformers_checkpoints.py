"""Checkpoints of patched models: a patched model's state_dict has the unpatched model's
keys, order, shapes and values (the HF block's names, not dsv3's), so save_pretrained
(which HF's Trainer calls itself) writes the checkpoint transformers loads, bit for
bit, into an unpatched model or one patched after loading, and an HF state_dict
loads into a patched model; state dicts with dsv3's names (saved by patched models
before) still load."""
import pytest
import torch

pytest.importorskip("transformers")  # only where it is not installed; CI has it

from conftest import assert_close
from hf_models import ARCHS, input_ids, sparse_block, tiny_model
from transformers_support import arch_param

import dsv3.integrations.transformers as dt


def _equal_state_dicts(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        assert got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("arch", [arch_param(a) for a in ARCHS])
def test_patched_state_dict_is_the_unpatched_models(arch):
    model = tiny_model(arch).eval()
    want = {key: value.clone() for key, value in model.state_dict().items()}
    dt.patch_moe(model)
    _equal_state_dicts(model.state_dict(), want)
    # An HF state_dict (other values) loads into the patched model, every key used.
    other = tiny_model(arch).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tensor in other.parameters():
            tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    other_state = {key: value.clone() for key, value in other.state_dict().items()}
    assert not model.load_state_dict(other_state, strict=True).missing_keys
    _equal_state_dicts(model.state_dict(), other_state)
    ids = input_ids()
    assert_close(model(ids).logits, other(ids).logits, "logits after load_state_dict")


# Every arch of ARCHS round-trips (checked, 5.24); these run: besides three plain ones,
# GPT-OSS's own block (gpt_oss.GptOssMoE), ERNIE's frozen [1, E] bias Parameter (an [E]
# buffer once patched) and a vision-language model.
@pytest.mark.parametrize("arch", [arch_param(a) for a in ("mixtral", "qwen2_moe", "deepseek_v3",
                                                          "gpt_oss", "ernie4_5_moe",
                                                          "qwen3_vl_moe")])
def test_save_pretrained_of_a_patched_model_round_trips(arch, tmp_path):
    if arch == "gpt_oss":
        from test_transformers_gpt_oss import tiny_gpt_oss
        # The limit 5.17 hard-codes (ignoring the config's), so that the loaded model,
        # which 5.17 gives that limit, computes the same.
        model = tiny_gpt_oss(swiglu_limit=7.0).eval()
    else:
        model = tiny_model(arch).eval()
    want = {key: value.clone() for key, value in model.state_dict().items()}
    ids = input_ids()
    want_logits = model(ids).logits
    dt.patch_moe(model)
    patched_logits = model(ids).logits
    model.save_pretrained(tmp_path)

    # The experts loop tiny_model runs (transformers' default differs, in the last bits).
    # (Its own class: a vision-language model is no causal LM.)
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True,
                                               experts_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    loaded.eval()
    _equal_state_dicts(loaded.state_dict(), want)
    # Loaded tensors may sit at any offset of the memory-mapped checkpoint (here 40 bytes
    # past a 64-byte boundary, with safetensors 0.8.0), where the CPU matmuls take other
    # code paths and differ in the last bits: the bit-for-bit comparison is on aligned
    # copies.
    with torch.no_grad():
        for parameter in loaded.parameters():
            parameter.data = parameter.data.clone()
    assert torch.equal(loaded(ids).logits, want_logits)
    dt.patch_moe(loaded)  # patched after loading: the patched model it was saved from
    assert torch.equal(loaded(ids).logits, patched_logits)


def test_dsv3_named_state_dict_still_loads():
    """A patched block's state_dict as it was saved before it took the HF names."""
    block = dt.from_module(sparse_block(tiny_model("deepseek_v3")))
    old = {name: tensor.detach() + 1.0 for name, tensor in block.named_parameters()}
    old["expert_bias"] = block.expert_bias + 1.0
    assert "gate_up_proj" in old and "shared_experts.gate_proj.weight" in old
    block.load_state_dict(old, strict=True)
    assert torch.equal(block.gate_up_proj, old["gate_up_proj"])
    assert torch.equal(block.expert_bias, old["expert_bias"])
    assert set(block.state_dict()) == {hf_name for _, hf_name, _, _ in block.hf_keys}


def test_distributed_checkpoint_state_dicts_of_a_patched_model():
    """torch.distributed.checkpoint's state-dict API, which sharded trainers save with,
    pairs a patched model's parameters (dsv3's names) with its state_dict (HF's)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict
    model = tiny_model("mixtral")
    dt.patch_moe(model)
    optimizer = torch.optim.AdamW(model.parameters())
    model(input_ids()).logits.float().sum().backward()
    optimizer.step()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    assert list(model_state) == list(model.state_dict())
    assert set(optimizer_state["state"]) == {name for name, _ in model.named_parameters()}
    other = tiny_model("mixtral")
    dt.patch_moe(other)
    set_model_state_dict(other, model_state)
    _equal_state_dicts(other.state_dict(), model.state_dict())
