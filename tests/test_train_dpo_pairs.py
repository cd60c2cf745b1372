"""The DPO stage's preference pairs (dsv3.train.data.preference_batch, dsv3.train.dpo):
a prompt and its chosen response from one document, domains drawn by the stage's
mixture, a seed per (step, micro-batch, rank), each pair's rows side by side, and a
resume that draws the reference model's init without moving the restored RNG."""
import numpy as np
import pytest
import torch

from dsv3.data.tokenizer import TokenizedCorpus
from dsv3.train import checkpoint as ckpt
from dsv3.train.config import StageConfig
from dsv3.train.data import preference_batch
from dsv3.train.dpo import dpo_loss
from dsv3.train.trainer import Trainer
from train_support import synthetic_data, three_stage_config


def numbered_corpus(lengths=(9, 30, 7, 25, 12)) -> TokenizedCorpus:
    """Document d is the run 1000 d + 0, 1, ...: any window tells which documents and
    positions it came from. No EOS: the numbers must all differ."""
    tokens, offsets = {}, {}
    for domain, base in (("alpha", 0), ("beta", 100_000)):
        pieces = [base + 1000 * d + np.arange(n) for d, n in enumerate(lengths)]
        tokens[domain] = np.concatenate(pieces).astype(np.uint32)
        offsets[domain] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenizedCorpus(tokens, offsets, eos_id=0, vocab_size=200_000)


def test_a_prompt_and_its_chosen_response_are_one_documents_text():
    """Before: windows were cut from the domain's stream across documents, so the
    "continuation" was often the start of another document (6% of the demo's pairs)."""
    corpus = numbered_corpus()
    for step in range(40):
        prompt, chosen, _ = preference_batch(corpus, 8, 6, 6, seed=0, step=step)
        text = torch.cat([prompt, chosen], dim=1)
        # one document (same thousands), consecutive positions
        assert torch.equal(text // 1000, text[:, :1] // 1000 + torch.zeros_like(text))
        assert torch.equal(text.diff(dim=1), torch.ones_like(text.diff(dim=1)))


def test_pairs_come_from_the_domains_the_weights_give():
    """Before: a DPO stage's mixture was checked, then ignored (a domain per pair drawn
    uniformly, whatever its size or weight)."""
    corpus = numbered_corpus()
    for step in range(20):
        prompt, _, rejected = preference_batch(corpus, 8, 4, 4, seed=1, step=step,
                                               weights={"alpha": 1.0, "beta": 0.0})
        assert (prompt < 100_000).all() and (rejected < 100_000).all()


def test_each_rank_and_micro_batch_gets_its_own_pairs():
    """Before: the seed was a product, and rank 257 drew rank 0's next micro-batch."""
    corpus = numbered_corpus()
    rank_257 = preference_batch(corpus, 4, 4, 4, seed=0, step=3, micro=0, rank=257)
    next_micro = preference_batch(corpus, 4, 4, 4, seed=0, step=3, micro=1, rank=0)
    assert not torch.equal(rank_257[0], next_micro[0])
    again = preference_batch(corpus, 4, 4, 4, seed=0, step=3, micro=0, rank=257)
    assert all(torch.equal(a, b) for a, b in zip(rank_257, again))  # reproducible


class RecordingModel(torch.nn.Module):
    """Uniform next-token logits; keeps the rows it was given."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def forward(self, tokens_BL):
        self.rows.append(tokens_BL)
        return torch.zeros(*tokens_BL.shape, 16)


def test_each_pairs_rows_go_side_by_side():
    """An MoE with a capacity drops the batch's later tokens first: with all chosen rows
    first, every dropped copy fell on a rejected response."""
    prompt, chosen, rejected = (torch.full((3, 4), v) for v in (1, 2, 3))
    chosen[:, 0] += torch.arange(3)
    policy = RecordingModel()
    dpo_loss(policy, RecordingModel(), prompt, chosen, rejected, beta=0.1)
    rows = policy.rows[0]
    assert rows.shape == (6, 7)
    assert (rows[0::2, 4] == chosen[:, 0]).all() and (rows[1::2, 4] == 3).all()


def test_a_resume_holding_a_reference_leaves_the_restored_rng_alone(tmp_path):
    """Building the reference drew its random init from the global RNG after the
    restore: the resumed run's RNG stream parted from the uninterrupted one's."""
    stages = [StageConfig("base", "lm", 0.5, seq_len=16),
              StageConfig("preference", "dpo", 0.5, seq_len=16)]
    config = three_stage_config(tmp_path, steps=8, stages=stages)
    data = synthetic_data()
    trainer = Trainer(config, data)
    for _ in range(6):  # into the DPO stage: a reference is held
        trainer.train_step()
    assert trainer.reference is not None
    trainer.save()
    saved_rng = ckpt.load_state(tmp_path)["rng"]
    resumed = Trainer(config, data)
    resumed.load_state_dict(ckpt.load_state(tmp_path))
    assert torch.equal(torch.get_rng_state(), saved_rng["torch"])


def test_a_dpo_stage_draws_by_its_own_mixture_else_where_the_schedule_paused(
        tmp_path, monkeypatch):
    import dsv3.train.trainer as trainer_module
    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs["weights"])
        return real(*args, **kwargs)

    real = trainer_module.preference_batch
    monkeypatch.setattr(trainer_module, "preference_batch", recording)
    data = synthetic_data()
    own = StageConfig("preference", "dpo", 0.5, seq_len=16, mixture_start={"alpha": 1.0})
    config = three_stage_config(tmp_path / "own", steps=4, stages=[
        StageConfig("base", "lm", 0.5, seq_len=16), own])
    Trainer(config, data).train(progress=False)
    assert seen and all(w == {"alpha": 1.0, "beta": 0.0} for w in seen)
    seen.clear()
    data.default_weights = {"alpha": [0.8, 0.2], "beta": [0.2, 0.8]}  # the prepared schedule
    plain = StageConfig("preference", "dpo", 0.5, seq_len=16)
    config = three_stage_config(tmp_path / "plain", steps=4, stages=[
        StageConfig("base", "lm", 0.5, seq_len=16), plain])
    Trainer(config, data).train(progress=False)
    # the LM stage ran the whole schedule: the pairs follow its end
    assert seen and all(w == pytest.approx({"alpha": 0.2, "beta": 0.8}) for w in seen)
