"""dsv3.train across stages: each DPO stage compares against the model as it entered
that stage (resumed runs too) and logs its step's metrics over every micro-batch;
the LM stages share one learning-rate schedule over
their own steps while each DPO stage restarts it; a curriculum stage ends at its
full sequence length."""
import dataclasses
import math

import pytest
import torch

from dsv3.train.config import OptimConfig, StageConfig, load_config
from dsv3.train.trainer import Trainer
from train_support import synthetic_data, three_stage_config

# 20 steps: LM 0-7, DPO 8-11, LM 12-15, DPO 16-19.
TWO_DPO_STAGES = [StageConfig("base", "lm", 0.4, seq_len=24),
                  StageConfig("preference", "dpo", 0.2, seq_len=16),
                  StageConfig("more", "lm", 0.2, seq_len=24),
                  StageConfig("preference2", "dpo", 0.2, seq_len=16)]


def test_each_dpo_stage_freezes_the_model_it_starts_from(tmp_path):
    trainer = Trainer(three_stage_config(tmp_path, stages=TWO_DPO_STAGES), synthetic_data())
    for step in range(20):
        entering = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        record = trainer.train_step(measure=True)
        if step in (8, 16):  # policy = reference: every margin is 0, the loss ln 2
            assert record["dpo/loss"] == pytest.approx(math.log(2), abs=1e-6), f"step {step}"
            for name, value in trainer.reference.state_dict().items():
                assert torch.equal(value, entering[name]), f"step {step}: reference {name}"


def test_dpo_metrics_are_the_mean_over_the_micro_batches(tmp_path, monkeypatch):
    """As the LM loss: with grad_accum=2, not the last micro-batch's alone."""
    import dsv3.train.trainer as trainer_module
    seen = []

    def dpo_loss(*args, **kwargs):
        loss, margin, accuracy = out = trainer_module_dpo_loss(*args, **kwargs)
        seen.append((loss.item(), margin.mean().item(), accuracy.item()))
        return out

    trainer_module_dpo_loss = trainer_module.dpo_loss
    monkeypatch.setattr(trainer_module, "dpo_loss", dpo_loss)
    config = three_stage_config(tmp_path, steps=6, grad_accum=2, stages=[
        StageConfig("base", "lm", 0.5, seq_len=24), StageConfig("pref", "dpo", 0.5, seq_len=16)])
    trainer = Trainer(config, synthetic_data())
    for _ in range(4):  # the LM stage, then the DPO stage's first step (every loss ln 2)
        trainer.train_step()
    seen.clear()
    record = trainer.train_step(measure=True)
    assert seen[0][0] != seen[1][0], "the micro-batches must differ for this test to tell"
    for i, name in enumerate(("dpo/loss", "dpo/reward_margin", "dpo/reward_accuracy")):
        values = [micro[i] for micro in seen]
        assert record[name] == pytest.approx(sum(values) / 2, rel=1e-6, abs=1e-9), \
            f"{name} {record[name]} is not the mean of {values}"


@pytest.mark.parametrize("stop", [14, 18])  # between the DPO stages; inside the second
def test_resume_keeps_the_stages_own_reference(tmp_path, stop):
    data = synthetic_data()
    straight = Trainer(three_stage_config(tmp_path / "a", stages=TWO_DPO_STAGES), data)
    straight.train(progress=False)
    first = Trainer(three_stage_config(tmp_path / "b", stages=TWO_DPO_STAGES), data)
    for _ in range(stop):
        first.train_step()
    first.save()
    resumed = Trainer(three_stage_config(tmp_path / "b", stages=TWO_DPO_STAGES), data)
    resumed.train(progress=False)
    for model in ("model", "reference"):
        for (name, a), b in zip(getattr(straight, model).state_dict().items(),
                                getattr(resumed, model).state_dict().values()):
            assert torch.equal(a, b), f"{model}.{name} differs after resuming at {stop}"


def test_a_checkpoint_from_before_per_stage_references_resumes(tmp_path):
    """Checkpoints written before references were kept per DPO stage have no
    reference_stage: the one they hold is the stage they stopped in."""
    config = three_stage_config(tmp_path)
    first = Trainer(config, synthetic_data())
    for _ in range(17):  # inside the DPO stage (steps 14-19)
        first.train_step()
    state = first.state_dict()
    del state["reference_stage"]
    resumed = Trainer(config, synthetic_data())
    resumed.load_state_dict(state)
    assert resumed.reference_stage == 2
    for name, value in first.reference.state_dict().items():
        assert torch.equal(resumed.reference.state_dict()[name], value), name


def lr_factors(config) -> list[float]:
    trainer = Trainer(config, synthetic_data())
    return [trainer.lr_at(step) / config.optim.lr for step in range(config.steps)]


def test_lm_stages_share_a_schedule_over_their_steps_and_dpo_restarts_it(tmp_path):
    """WSD over the 14 LM steps: warm-up 3, decay over the last 3 (2.8) LM steps down
    to the floor; the DPO stage (lr_scale 0.3) restarts it over its 6 steps."""
    config = three_stage_config(tmp_path, optim=OptimConfig(schedule="wsd", warmup_steps=3))
    lm = [1 / 3, 2 / 3] + [1.0] * 9 + [0.7, 0.4, 0.1]
    dpo = [0.3 * f for f in [1.0] * 5 + [0.1]]
    assert lr_factors(config) == pytest.approx(lm + dpo)
    cosine = lr_factors(dataclasses.replace(config, optim=OptimConfig(warmup_steps=3)))
    assert cosine[2:4] == pytest.approx([1.0, 1.0]) and cosine[13] == pytest.approx(0.1)
    assert cosine[14] == pytest.approx(0.3) and cosine[19] == pytest.approx(0.03)


def test_a_dpo_stage_pauses_the_lm_schedule(tmp_path):
    """12 LM steps (0-7, 12-15): the decay (last 2 of them) is steps 14 and 15."""
    factors = lr_factors(three_stage_config(
        tmp_path, stages=TWO_DPO_STAGES, optim=OptimConfig(schedule="wsd", warmup_steps=2)))
    assert factors[:8] == pytest.approx([0.5] + [1.0] * 7)
    assert factors[8:12] == pytest.approx([1.0, 1.0, 1.0, 0.1])  # DPO: its own decay
    assert factors[12:16] == pytest.approx([1.0, 1.0, 0.55, 0.1])
    assert factors[16:] == pytest.approx([1.0, 1.0, 1.0, 0.1])


def curriculum_lengths(config, index: int) -> list[int]:
    trainer = Trainer(config, synthetic_data())
    return [Trainer.seq_len_at(stage, progress)
            for i, stage, progress in map(trainer.stage_at, range(config.steps)) if i == index]


def test_a_curriculum_stage_ends_at_its_sequence_length(tmp_path):
    assert curriculum_lengths(three_stage_config(tmp_path), 1) == [16, 16, 16, 24, 24, 32]
    demo = dataclasses.replace(load_config("dsv3/train/configs/demo.toml"), out_dir=str(tmp_path))
    lengths = curriculum_lengths(demo, 1)  # 64 -> 256 over 180 steps
    assert lengths[0] == 64 and lengths[-1] == 256 and lengths == sorted(lengths)
    assert all(length % 8 == 0 for length in lengths)
