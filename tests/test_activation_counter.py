"""The trainer's activation counter (dsv3.train.metrics.saved_activation_bytes) under
selective checkpointing: it counts the op outputs the policy keeps on every torch, also
where checkpoint's cache keeps them past the saved-tensor hooks (torch 2.11, without
checkpoint's respect_saved_tensors_hooks), and where the hooks see them (2.14) the
counter adds nothing of its own."""
import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, SelectiveCheckpointContext

import dsv3.model as model_module
from dsv3.model import ModelConfig, Transformer, observing_selective_saves
from dsv3.moe import MoEConfig
from dsv3.train.metrics import saved_activation_bytes


@pytest.fixture(autouse=True, params=["torch's own", "none (as torch 2.11-2.13)"])
def sac_hooks(request, monkeypatch):
    """Every test also as on a torch whose checkpoint cannot route what selective
    checkpointing keeps through saved-tensor hooks (the counter observes it instead),
    so that path is tested on any torch."""
    if request.param == "torch's own":
        yield
        return
    monkeypatch.setattr(model_module, "_SAC_HOOKS", {})
    with warnings.catch_warnings():  # torch 2.14 asks to choose: this is the other choice
        warnings.filterwarnings("ignore", "A saved_tensors_hooks context", FutureWarning)
        yield


def small_model() -> Transformer:
    # A dense block and two MoE ones with a shared expert: every kind of residual
    # projection the policy recomputes, and the routing it keeps.
    moe = MoEConfig(dim=32, ffn_dim=48, n_experts=4, top_k=2, n_shared_experts=1)
    config = ModelConfig(vocab_size=97, dim=32, n_layers=3, n_heads=4, n_kv_heads=2,
                         max_seq_len=64, n_dense_layers=1, dense_ffn_dim=64, moe=moe)
    torch.manual_seed(0)
    return Transformer(config).train()


def counted_bytes(model, tokens, mode: str) -> int:
    model.set_checkpointing(mode)
    counter = [0]
    with saved_activation_bytes(counter, model):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return counter[0]


class KeptByPolicy(TorchDispatchMode):
    """The outputs selective checkpointing's policy keeps, asked op by op over blocks
    run without checkpointing (the same ops as its forward)."""

    def __init__(self):
        super().__init__()
        self.kept = []  # held: a freed storage's address could come back for another

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        decision = model_module._selective_policy(SelectiveCheckpointContext(is_recompute=False),
                                                  func, *args, **kwargs)
        if decision == CheckpointPolicy.MUST_SAVE:
            self.kept += [t for t in (out if isinstance(out, (tuple, list)) else (out,))
                          if isinstance(t, torch.Tensor)]
        return out

    def nbytes(self) -> int:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in self.kept}
        return sum(storages.values())


@pytest.mark.parametrize("autocast", [False, True])
def test_counter_adds_what_selective_checkpointing_keeps(autocast):
    model = small_model()
    tokens = torch.randint(0, 97, (2, 17))
    precision = (torch.autocast("cpu", dtype=torch.bfloat16) if autocast
                 else contextlib.nullcontext())
    with precision:
        full = counted_bytes(model, tokens, "full")
        selective = counted_bytes(model, tokens, "selective")
        kept = KeptByPolicy()
        x_BSD = model.embed(tokens[:, :-1])
        cos_SH, sin_SH = model.rope_cos[:16], model.rope_sin[:16]
        for block in model.blocks:
            with model_module._marking(block.residual_projections()), kept:
                x_BSD = block(x_BSD, cos_SH, sin_SH)
    # Both modes save the blocks' inputs and everything outside the blocks alike;
    # selective also keeps the outputs its policy picks, and only those.
    assert kept.nbytes() > 0
    assert selective - full == kept.nbytes(), (selective, full, kept.nbytes())


def test_kept_outputs_are_observed_only_where_the_hooks_miss_them():
    """On a torch whose checkpoint routes what it keeps through saved-tensor hooks, the
    counter's hook sees it already: observing it too would be work for nothing."""
    model = small_model()
    model.set_checkpointing("selective")
    tokens = torch.randint(0, 97, (2, 16))
    observed = []
    with observing_selective_saves(observed.append):
        model(tokens).float().mean().backward()
    hooks_see_them = bool(model_module._SAC_HOOKS)
    assert (len(observed) == 0) == hooks_see_them, (len(observed), torch.__version__)


def test_counting_changes_no_gradient():
    """The trainer counts on its logged steps, which train like any other."""
    model = small_model()
    model.set_checkpointing("selective")
    tokens = torch.randint(0, 97, (2, 16))

    def loss_and_grads(counting: bool):
        model.zero_grad()
        with saved_activation_bytes([0], model) if counting else contextlib.nullcontext():
            loss = model(tokens).float().logsumexp(-1).mean()
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want_loss, want_grads = loss_and_grads(False)
    got_loss, got_grads = loss_and_grads(True)
    assert torch.equal(got_loss, want_loss)
    for name, grad in want_grads.items():
        assert torch.equal(got_grads[name], grad), name
