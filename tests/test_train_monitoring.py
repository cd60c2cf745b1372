"""dsv3.train's monitoring and MoE bookkeeping: the expert loads and moe/* metrics
of a step cover all its micro-batches; MFU counts a tied output head; a skipped
fp16 step leaves the expert selection bias alone."""
import dataclasses

import pytest
import torch

from dsv3.model import Transformer, preset
from dsv3.train.config import StageConfig
from dsv3.train.metrics import training_flops_per_token
from dsv3.train.trainer import Trainer
from train_support import synthetic_data, three_stage_config


def first_step_panel(config) -> tuple[list, dict]:
    trainer = Trainer(config, synthetic_data())
    trainer._log(trainer.train_step(measure=True))
    return trainer.load_counts, trainer.logger.history[-1]


def test_expert_loads_and_moe_metrics_cover_every_micro_batch(tmp_path):
    """2 micro-batches of 4 rows route the same tokens as 1 batch of 8 rows."""
    base = three_stage_config(tmp_path, stages=[StageConfig("base", "lm", 1.0, seq_len=24)])
    moe = dict(base.model_overrides["moe"], z_loss_coef=1e-3)
    base = dataclasses.replace(base, model_overrides=dict(base.model_overrides, moe=moe))
    big_counts, big = first_step_panel(dataclasses.replace(base, micro_batch=8, grad_accum=1))
    small_counts, small = first_step_panel(dataclasses.replace(base, micro_batch=4, grad_accum=2))
    for big_layer, small_layer in zip(big_counts, small_counts):
        assert small_layer.sum() == 8 * 24 * 2  # rows * tokens * top_k
        assert torch.equal(small_layer, big_layer)
    for key in ("load_max_over_mean", "load_cv", "dropped_tokens", "z_loss", "router_entropy"):
        assert small[f"moe/{key}"] == pytest.approx(big[f"moe/{key}"], rel=1e-5), key


def test_expert_loads_stay_exact_past_what_fp32_counts(tmp_path):
    """A long run's loads pass 2^24 copies an expert, where fp32 rounds single copies
    away: the heat map of a long run drifted."""
    config = three_stage_config(tmp_path, stages=[StageConfig("base", "lm", 1.0, seq_len=24)])
    trainer = Trainer(config, synthetic_data())
    for counts in trainer.load_counts:
        counts.fill_(2 ** 24 + 1)
    trainer.train_step()
    for counts, stats in zip(trainer.load_counts, trainer.moe_stats):
        assert torch.equal(counts - (2 ** 24 + 1), stats.tokens_per_expert.long())
        assert stats.tokens_per_expert.sum() > 0


def test_mfu_counts_the_output_head_of_a_tied_model():
    """Tied or not, the head is the same matmul and the embedding a lookup."""
    untied, tied = (Transformer(dataclasses.replace(preset("tiny"), tie_embeddings=tie))
                    for tie in (False, True))
    assert training_flops_per_token(tied, 128) == training_flops_per_token(untied, 128)


def test_a_skipped_fp16_step_leaves_the_expert_bias(tmp_path):
    config = three_stage_config(tmp_path, precision="fp16",
                                stages=[StageConfig("base", "lm", 1.0, seq_len=24)])
    trainer = Trainer(config, synthetic_data())
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)  # fp16 grads overflow
    biases = [layer.expert_bias.clone() for layer in trainer.model.moe_layers()]
    assert trainer.train_step()["skipped"]
    for layer, bias in zip(trainer.model.moe_layers(), biases):
        assert torch.equal(layer.expert_bias, bias)
        assert not layer.pending_counts.any(), "the skipped step's routing must not count"
    trainer.scaler = torch.amp.GradScaler("cpu")
    assert not trainer.train_step()["skipped"]
    assert any(not torch.equal(layer.expert_bias, bias)
               for layer, bias in zip(trainer.model.moe_layers(), biases))


def test_the_progress_bar_shows_each_steps_stage_and_the_last_logged_loss(tmp_path,
                                                                         monkeypatch):
    """Its text was set on logged steps only: between them it showed the stage of the
    last logged step (at step 39 of 60 "stage=base" in the next stage), and no loss at
    all before the first log."""
    import dsv3.train.trainer as trainer_module
    shown = []

    class Bar:
        def __init__(self, *args, **kwargs):
            pass

        def set_postfix(self, postfix, refresh=True):
            shown.append(dict(postfix))

        def update(self, n):
            pass

        def close(self):
            pass

    monkeypatch.setattr(trainer_module, "tqdm", Bar)
    config = three_stage_config(tmp_path, steps=10, log_every=4)
    trainer = Trainer(config, synthetic_data())
    trainer.train(progress=True)
    stages = [config.stages[trainer.stage_at(step)[0]].name for step in range(10)]
    assert [p["stage"] for p in shown] == stages
    assert [p["loss"].split(" (")[-1] for p in shown] == \
        ["not logged yet"] * 3 + ["step 4)"] * 4 + ["step 8)"] * 2 + ["step 10)"]


def test_a_diverged_loss_is_logged_with_an_infinite_perplexity(tmp_path):
    """Before: exp() of a finite loss above ~709.8 raised OverflowError and ended the
    run on its next logged step, before its record or a checkpoint was written."""
    trainer = Trainer(three_stage_config(tmp_path), synthetic_data())
    with torch.no_grad():
        trainer.model.head.weight.mul_(2e5)  # logits in the thousands
    record = trainer.train_step(measure=True)
    assert 709.8 < record["loss"] < float("inf")
    assert record["perplexity"] == float("inf")
