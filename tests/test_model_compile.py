"""dsv3.model under torch.compile with activation checkpointing: "full" compiles
(fullgraph) through model.compile() and matches eager, balance counts not doubled by the
compiled recompute; torch.compile(model) without dynamo's side-effect setting, and
"selective" (whose policy needs the modules a compiled graph no longer shows), are
refused with a message naming the setting. Before, every checkpointing mode crashed
inside dynamo ("checkpoint not implemented for ... context_fn")."""
import copy

import pytest
import torch

import dsv3
from dsv3.model import ModelConfig, Transformer
from dsv3.moe import MoEConfig

FLAG = "skip_fwd_side_effects_in_bwd_under_checkpoint"


def small() -> Transformer:
    moe = MoEConfig(dim=32, ffn_dim=24, n_experts=4, top_k=2, n_shared_experts=1,
                    score="sigmoid", bias_update_rate=1e-2, z_loss_coef=1e-3)
    config = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, max_seq_len=32,
                         n_dense_layers=1, dense_ffn_dim=48, moe=moe)
    return Transformer(config).train()


def test_full_checkpointing_compiles_and_matches_eager():
    torch._dynamo.reset()
    compiled = small()
    eager = copy.deepcopy(compiled)
    compiled.set_checkpointing("full")
    compiled.compile(fullgraph=True)
    for step in range(2):  # the second step reuses the graph, after a bias update
        tokens = torch.randint(0, 61, (2, 16))
        results = []
        for model in (compiled, eager):
            logits = model(tokens)
            (logits.logsumexp(-1).mean() + dsv3.moe_aux_loss(model)).backward()
            results.append((logits.detach(), dsv3.moe_aux_loss(model).detach(),
                            [p.grad.clone() for p in model.parameters()],
                            [moe.pending_counts.clone() for moe in model.moe_layers()]))
        (got, got_aux, got_grads, got_counts), (want, want_aux, want_grads, want_counts) = results
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_aux, want_aux)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b)
        for a, b in zip(got_counts, want_counts):
            assert torch.equal(a, b)  # counted once, not again by the recompute
            assert a.sum().item() == 2 * 16 * 2
        for model in (compiled, eager):
            dsv3.moe_update_bias(model)
            model.zero_grad()
    # The setting was scoped to the model's calls.
    assert not getattr(torch._dynamo.config, FLAG)


@pytest.mark.parametrize("mode, match", [
    ("full", f"checkpointing='full' under torch.compile needs torch._dynamo.config.{FLAG}"),
    ("selective", "checkpointing='selective' does not run under torch.compile"),
])
def test_unsupported_compiled_checkpointing_is_refused_by_name(mode, match):
    torch._dynamo.reset()
    model = small()
    model.set_checkpointing(mode)
    tokens = torch.randint(0, 61, (2, 8))
    with pytest.raises(ValueError, match=match):
        torch.compile(model)(tokens)
    # fullgraph=True cannot raise our error itself (dynamo refuses the call that would):
    # its error carries the message as the reason.
    torch._dynamo.reset()
    with pytest.raises(Exception, match=match):
        torch.compile(model, fullgraph=True)(tokens)
    # The selective policy cannot run compiled even with the setting.
    if mode == "selective":
        with torch._dynamo.config.patch(**{FLAG: True}), pytest.raises(ValueError, match=match):
            model.compile()
            model(tokens)
