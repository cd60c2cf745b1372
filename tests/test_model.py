"""dsv3.model: the decoder LM around dsv3.MoE. Shapes and layer kinds, the three
activation-checkpointing modes against none (same loss and gradients, balance
counts not doubled by the replay; selective's choices under autocast), KV-cache decoding
against the full forward, parameter counts, bad configs, presets and meta-device init."""
import collections
import dataclasses
import math
from dataclasses import replace

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy

import dsv3.model as model_module
from conftest import assert_close
from dsv3 import MoE
from dsv3.model import PRESETS, KVCache, ModelConfig, Transformer, preset
from dsv3.moe import MoEConfig, SwiGLUMLP, moe_aux_loss


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


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpoint_replay_keeps_the_forwards_losses_and_stats(mode):
    """With torch's early stop off, the recompute runs the whole block, MoE records
    included: the layers must keep the forward's aux_loss (the one the loss holds; the
    replay's would keep the recomputed graph alive) and its stats."""
    model = tiny()
    model.set_checkpointing(mode)
    for moe in model.moe_layers():
        moe.collect_router_entropy = True
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        loss = model(torch.randint(0, 97, (3, 16))).float().logsumexp(-1).mean()
    recorded = [(moe.aux_loss, moe.last_stats, moe.last_stats.router_entropy)
                for moe in model.moe_layers()]
    (loss + moe_aux_loss(model)).backward()
    for moe, (aux_loss, stats, entropy) in zip(model.moe_layers(), recorded):
        assert moe.aux_loss is aux_loss and moe.last_stats is stats
        assert moe.last_stats.router_entropy is entropy
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
    (dict(n_heads=4, n_kv_heads=3), "n_heads=4 .* multiple of n_kv_heads=3"),
    (dict(n_dense_layers=4), "n_dense_layers must be in"),
    (dict(dim=0), "dim must be >= 1, got 0"),
    (dict(vocab_size=True), "vocab_size must be a whole number, got True"),
    (dict(moe=MoEConfig(dim=16, ffn_dim=8, n_experts=2, top_k=1)), "moe.dim=16 must equal dim=32"),
    # Each let through before: a model built (n_kv_heads=0: as many as n_heads; the
    # others ran on garbage) or failed later in torch with a message naming no field.
    (dict(n_kv_heads=0), "n_kv_heads must be >= 1, got 0"),
    (dict(n_kv_heads=-1), "n_kv_heads must be >= 1, got -1"),
    (dict(n_kv_heads=2.0), "n_kv_heads must be a whole number, got 2.0"),
    (dict(rope_theta=0.0), "rope_theta must be > 0, got 0.0"),
    (dict(rope_theta=-1.0), "rope_theta must be > 0"),
    (dict(rope_theta=math.inf), "rope_theta must be finite"),
    (dict(norm_eps=0.0), "norm_eps must be > 0"),
    (dict(norm_eps=-1.0), "norm_eps must be > 0"),
    (dict(norm_eps=math.nan), "norm_eps must be finite, got nan"),
    (dict(n_dense_layers=1.5), "n_dense_layers must be a whole number, got 1.5"),
    (dict(n_dense_layers=True), "n_dense_layers must be a whole number, got True"),
    (dict(n_dense_layers=-1), "n_dense_layers must be >= 0, got -1"),
    (dict(tie_embeddings="no"), "tie_embeddings must be a bool, got 'no'"),
    (dict(moe="x"), "moe must be a MoEConfig, a dict of its fields or None, got 'x'"),
])
def test_bad_config_names_the_field(overrides, match):
    with pytest.raises(ValueError, match=f"ModelConfig: {match}"):
        tiny(**overrides)


def test_config_defaults_and_dict_moe_still_build():
    model = tiny(n_kv_heads=None, moe=dict(dim=32, ffn_dim=48, n_experts=4, top_k=2))
    assert model.blocks[0].attn.n_kv_heads == 4 and isinstance(model.blocks[1].ffn, MoE)


def test_preset_returns_a_copy_of_its_moe_config():
    # preset() copied shallowly: the MoEConfig was PRESETS' own, and changing it changed
    # every later preset("tiny").
    config = preset("tiny")
    config.moe.capacity_factor = 1.25
    assert config.moe is not PRESETS["tiny"].moe
    assert preset("tiny").moe.capacity_factor is None


@pytest.mark.parametrize("assign", [False, True], ids=["to_empty", "assign"])
def test_meta_device_build_then_load_matches_the_original(assign):
    """Built on the meta device, then to_empty() + load_state_dict() (or
    load_state_dict(assign=True)): the rotary tables, non-persistent buffers that no
    state dict carries, are recomputed. Before: uninitialized memory (NaN routing)."""
    original = tiny().eval()
    with torch.device("meta"):
        model = tiny()
    if not assign:
        model.to_empty(device="cpu")
    model.load_state_dict(original.state_dict(), assign=assign)
    model.eval()
    assert model.rope_cos.device.type == "cpu"
    assert torch.equal(model.rope_cos, original.rope_cos)
    assert torch.equal(model.rope_sin, original.rope_sin)
    tokens = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(tokens), original(tokens))


def test_rope_tables_survive_to_empty_and_casts():
    model = tiny()
    want = model.rope_cos.clone()
    model.to_empty(device="cpu")
    assert torch.equal(model.rope_cos, want)
    model.to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.bfloat16
    assert torch.equal(model.rope_cos, want.to(torch.bfloat16))


def test_selective_checkpointing_under_autocast_recomputes_the_residual_projections(monkeypatch):
    """The policy keeps matmul outputs except those of the projections writing into the
    residual stream. Before, it recognised them by the weight's storage, and under
    autocast the matmul reads autocast's bf16 copy: every output was kept (the trainer
    always runs under autocast, so selective checkpointing saved nothing there)."""
    model = tiny(moe=MoEConfig(dim=32, ffn_dim=48, n_experts=4, top_k=2, n_shared_experts=1))
    tokens = torch.randint(0, 97, (2, 12))
    decisions = collections.Counter()
    running = {}
    make_contexts = model_module.create_selective_checkpoint_contexts

    def counting_contexts(policy, *args, **kwargs):
        def counting_policy(ctx, op, *op_args, **op_kwargs):
            decision = policy(ctx, op, *op_args, **op_kwargs)
            # a matmul: torch's, or the grouped GEMM a bf16 HalfLinear takes on a CPU
            # without native bf16 matmul (dsv3/ops/linear.py)
            matmul = op in model_module._SAVED_OPS or (
                getattr(op, "namespace", None) == "dsv3" and op._opname.startswith("grouped_mm"))
            if matmul and not ctx.is_recompute:
                decisions[(running["autocast"], decision)] += 1
            return decision
        return make_contexts(counting_policy, *args, **kwargs)
    monkeypatch.setattr(model_module, "create_selective_checkpoint_contexts", counting_contexts)

    def loss_and_grads(mode, autocast):
        running["autocast"] = autocast
        model.set_checkpointing(mode)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(tokens).float().logsumexp(-1).mean()
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    for autocast in (False, True):
        want = loss_and_grads("none", autocast)
        got = loss_and_grads("selective", autocast)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    projections = 6  # attention's out x3, the dense down_proj, the shared experts' x2
    for autocast in (False, True):
        assert decisions[(autocast, CheckpointPolicy.PREFER_RECOMPUTE)] == projections
    assert decisions[(True, CheckpointPolicy.MUST_SAVE)] == decisions[
        (False, CheckpointPolicy.MUST_SAVE)] > 0


def test_bad_tokens_and_too_long_input():
    model = tiny()
    with pytest.raises(ValueError, match="tokens_BS must be an int tensor"):
        model(torch.randn(2, 4))
    with pytest.raises(ValueError, match="exceed max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="checkpointing must be one of"):
        model.set_checkpointing("some")


def test_tied_embeddings_stay_tied_on_the_meta_device_paths(tmp_path):
    """to_empty() and load_state_dict(assign=True) gave the head and the embedding a
    tensor each: num_parameters counted vocab x dim twice and they trained apart."""
    from dsv3.model import ModelConfig, Transformer
    from dsv3.train.planner import parameter_counts
    config = ModelConfig(vocab_size=97, dim=32, n_layers=1, n_heads=4, max_seq_len=64,
                         dense_ffn_dim=48, tie_embeddings=True)
    with torch.device("meta"):
        emptied = Transformer(config)
    emptied.to_empty(device="cpu")
    source = Transformer(config)
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    with torch.device("meta"):
        loaded = Transformer(config)
    loaded.load_state_dict(torch.load(tmp_path / "weights.pt"), assign=True)
    for model in (emptied, loaded):
        assert model.head.weight is model.embed.weight
        assert model.num_parameters() == parameter_counts(config)["total"]
    assert torch.equal(loaded(torch.arange(8)[None]), source(torch.arange(8)[None]))


def test_routed_experts_start_at_the_models_init_std():
    """Before: they kept MoE's own uniform init (std 0.036 in "small", 0.007 in
    "deepseek-v3") where every other matmul weight starts at 0.02."""
    torch.manual_seed(0)
    model = Transformer(preset("small"))
    for moe in model.moe_layers():
        for weight in (moe.gate_up_proj, moe.down_proj):
            assert abs(weight.detach().std().item() - 0.02) < 0.001


@pytest.mark.parametrize("shape", [(2, 0), (0, 5)])
def test_an_empty_batch_or_sequence_gives_an_empty_output(shape):
    """Before: "cannot reshape tensor of 0 elements ... -1 ... ambiguous" in attention
    (the MoE layers already took an empty batch)."""
    config = replace(preset("tiny"), vocab_size=64)
    model = Transformer(config)
    logits = model(torch.zeros(shape, dtype=torch.long))
    assert logits.shape == (*shape, 64)
    logits.sum().backward()


def test_an_fp64_model_runs_rotary_in_fp64():
    """Before: apply_rope computed in fp32 and the tables were fp32, so an fp64
    model's attention failed gradcheck."""
    config = replace(preset("tiny"), vocab_size=64, max_seq_len=16)
    model = Transformer(config).double()
    assert model.rope_cos.dtype == torch.float64
    attention = model.blocks[0].attn
    x = torch.randn(1, 5, config.dim, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: attention(x, model.rope_cos[:5], model.rope_sin[:5]), (x,))


@pytest.mark.parametrize("bad", [64, -1])
def test_token_ids_outside_the_vocabulary_are_named(bad):
    """Before: IndexError "index out of range in self" from nn.Embedding."""
    model = Transformer(replace(preset("tiny"), vocab_size=64))
    with pytest.raises(ValueError, match=rf"tokens_BS holds ids from -?\d+ to \d+, outside "
                                         rf"the vocabulary \[0, 64\)"):
        model(torch.tensor([[1, bad]]))
