"""dsv3.model: the decoder LM around dsv3.MoE. Shapes and layer kinds, the three
activation-checkpointing modes against none (same loss and gradients, balance
counts not doubled by the replay), KV-cache decoding against the full forward,
parameter counts and bad configs."""
import dataclasses

import pytest
import torch

from conftest import assert_close
from dsv3 import MoE
from dsv3.model import KVCache, ModelConfig, Transformer, preset
from dsv3.moe import MoEConfig, SwiGLUMLP


def tiny(**overrides) -> Transformer:
    moe = MoEConfig(dim=32, ffn_dim=48, n_experts=4, top_k=2, bias_update_rate=1e-3)
    config = ModelConfig(vocab_size=97, dim=32, n_layers=3, n_heads=4, n_kv_heads=2,
                         max_seq_len=64, n_dense_layers=1, dense_ffn_dim=64, moe=moe)
    return Transformer(dataclasses.replace(config, **overrides))


def test_layers_are_dense_then_moe():
    model = tiny()
    kinds = [type(block.ffn) for block in model.blocks]
    assert kinds == [SwiGLUMLP, MoE, MoE]
    logits = model(torch.randint(0, 97, (2, 10)))
    assert logits.shape == (2, 10, 97) and torch.isfinite(logits).all()


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_matches_no_checkpointing(mode):
    model = tiny()
    tokens = torch.randint(0, 97, (3, 16))

    def loss_and_grads():
        model.zero_grad()
        for moe in model.moe_layers():
            moe.pending_counts.zero_()
        loss = model(tokens).float().logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    model.set_checkpointing("none")
    want_loss, want_grads = loss_and_grads()
    model.set_checkpointing(mode)
    got_loss, got_grads = loss_and_grads()
    assert_close(got_loss, want_loss, "loss")
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], f"grad of {name}")
    # The replayed forward must not count the routing a second time.
    for moe in model.moe_layers():
        assert moe.pending_counts.sum().item() == 3 * 16 * moe.config.top_k


def test_kv_cache_decoding_matches_full_forward():
    model = tiny().eval()
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache()
        prefix = model(tokens[:, :5], kv_cache=cache)
        steps = [model(tokens[:, i:i + 1], kv_cache=cache) for i in range(5, 12)]
    assert_close(prefix, full[:, :5], "prefill logits")
    assert_close(torch.cat(steps, 1), full[:, 5:], "decoded logits")
    assert cache.length == 12


def test_parameter_counts():
    model = tiny()
    total = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == total
    # Two MoE layers, 4 experts each, top-2: two experts' weights per layer inactive.
    per_expert = 2 * 48 * 32 + 32 * 48
    assert model.num_parameters(active=True) == total - 2 * 2 * per_expert


def test_presets_build_and_validate():
    assert preset("tiny").moe.n_experts == 8
    assert preset("deepseek-v3").moe.score == "sigmoid"
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        preset("huge")


@pytest.mark.parametrize("overrides, match", [
    (dict(n_heads=5), "n_heads=5 must divide dim=32"),
    (dict(n_heads=4, n_kv_heads=3), "multiple of n_kv_heads=3"),
    (dict(n_dense_layers=4), "n_dense_layers must be in"),
    (dict(dim=0), "dim must be a positive int"),
    (dict(moe=MoEConfig(dim=16, ffn_dim=8, n_experts=2, top_k=1)), "moe.dim=16 must equal dim=32"),
])
def test_bad_config_names_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def test_bad_tokens_and_too_long_input():
    model = tiny()
    with pytest.raises(ValueError, match="tokens_BS must be an int tensor"):
        model(torch.randn(2, 4))
    with pytest.raises(ValueError, match="exceed max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="checkpointing must be one of"):
        model.set_checkpointing("some")
