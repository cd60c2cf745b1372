"""dsv3.train across stages: each DPO stage compares against the model as it entered
that stage (resumed runs too) and logs its step's metrics over every micro-batch;
the LM stages share one learning-rate schedule over
their own steps while each DPO stage restarts it; a curriculum stage ends at its
full sequence length; the prepared mixture schedule runs once across the stages
without a mixture of their own, over the spans the run started with."""
import dataclasses
import math

import pytest
import torch

from dsv3.train import checkpoint as ckpt
from dsv3.train.config import OptimConfig, StageConfig, load_config
from dsv3.train.data import TrainData
from dsv3.train.trainer import Trainer
from train_support import synthetic_corpus, synthetic_data, three_stage_config

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


def _lm_then_dpo(tmp_path, steps: int) -> Trainer:
    """An LM stage, then a DPO stage, each half the steps, two micro-batches a step."""
    config = three_stage_config(tmp_path, steps=steps, grad_accum=2, stages=[
        StageConfig("base", "lm", 0.5, seq_len=24), StageConfig("pref", "dpo", 0.5, seq_len=16)])
    return Trainer(config, synthetic_data())


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
    trainer = _lm_then_dpo(tmp_path, steps=6)
    for _ in range(4):  # the LM stage, then the DPO stage's first step (every loss ln 2)
        trainer.train_step()
    seen.clear()
    record = trainer.train_step(measure=True)
    assert seen[0][0] != seen[1][0], "the micro-batches must differ for this test to tell"
    for i, name in enumerate(("dpo/loss", "dpo/reward_margin", "dpo/reward_accuracy")):
        values = [micro[i] for micro in seen]
        assert record[name] == pytest.approx(sum(values) / 2, rel=1e-6, abs=1e-9), \
            f"{name} {record[name]} is not the mean of {values}"


@pytest.fixture(scope="module")
def straight_two_dpo_run(tmp_path_factory):
    """One uninterrupted run for every resume case to match (each trained its own)."""
    trainer = Trainer(three_stage_config(tmp_path_factory.mktemp("straight"),
                                         stages=TWO_DPO_STAGES), synthetic_data())
    trainer.train(progress=False)
    return trainer


@pytest.mark.parametrize("stop", [14, 18])  # between the DPO stages; inside the second
def test_resume_keeps_the_stages_own_reference(tmp_path, stop, straight_two_dpo_run):
    data, straight = synthetic_data(), straight_two_dpo_run
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


def test_dpo_steps_train_on_the_policys_balance_losses(tmp_path, monkeypatch):
    """The LM stages added the MoE aux / z losses to their loss and the DPO stages did
    not, so routing could drift from balance there. Each DPO micro-batch's backward
    now runs through the policy's (not the frozen reference's) balance losses."""
    import dsv3.train.trainer as trainer_module
    reached = []

    def moe_aux_loss(model):
        aux = real(model)
        assert model is trainer.model and aux.requires_grad
        aux.register_hook(lambda grad: reached.append(grad.item()))
        return aux

    real = trainer_module.moe_aux_loss
    monkeypatch.setattr(trainer_module, "moe_aux_loss", moe_aux_loss)
    trainer = _lm_then_dpo(tmp_path, steps=4)
    for _ in range(2):
        trainer.train_step()
    reached.clear()
    assert trainer.stage_at(trainer.step)[1].kind == "dpo"
    trainer.train_step()
    assert reached == [pytest.approx(0.5)] * 2  # each micro-batch's, scaled by 1 / grad_accum


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
    # the synthetic data has none of the demo's domains (refused before any step)
    demo.stages = [dataclasses.replace(s, mixture_start={}, mixture_end={}) for s in demo.stages]
    lengths = curriculum_lengths(demo, 1)  # 64 -> 256 over 180 steps
    assert lengths[0] == 64 and lengths[-1] == 256 and lengths == sorted(lengths)
    assert all(length % 8 == 0 for length in lengths)


# 10 steps: two stages on the prepared mixture (0-3, 6-9) around one of its own (4-5).
AROUND_A_STAGE_MIXTURE = [
    StageConfig("first", "lm", 0.4, seq_len=24),
    StageConfig("own", "lm", 0.2, seq_len=24, mixture_start={"alpha": 1.0}),
    StageConfig("second", "lm", 0.4, seq_len=24)]


def _prepared_mixture_data() -> TrainData:
    """alpha falls from every token to none over the prepared schedule; units of at
    most 8 tokens."""
    return TrainData.from_corpus(synthetic_corpus(), {"alpha": [1.0, 0.0], "beta": [0.0, 1.0]},
                                 val_fraction=0.1, max_chunk_tokens=8)


def _stage_loader_at(trainer, step):
    while trainer.step < step:
        trainer.train_step()
    trainer.train_step()  # opens the loader of the stage of `step`
    return trainer._loader


def test_the_prepared_mixture_runs_once_across_the_stages_without_their_own(tmp_path):
    """Before: it restarted at each such stage (alpha back to 1.0 in "second") and
    mixture.json's max_chunk_tokens was ignored (1024)."""
    config = three_stage_config(tmp_path, steps=10, stages=AROUND_A_STAGE_MIXTURE)
    trainer = Trainer(config, _prepared_mixture_data())
    first = _stage_loader_at(trainer, 0)
    assert first.schedule.weights_at(0.0) == pytest.approx([1.0, 0.0])
    assert first.schedule.weights_at(1.0) == pytest.approx([0.5, 0.5])  # half of the tokens
    assert first.settings["max_chunk_tokens"] == 8
    second = _stage_loader_at(trainer, 6)
    assert second.schedule.weights_at(0.0) == pytest.approx([0.5, 0.5])
    assert second.schedule.weights_at(1.0) == pytest.approx([0.0, 1.0])


def test_a_checkpoint_from_before_keeps_each_stages_own_schedule(tmp_path):
    """Exact resume of a checkpoint saved before the schedule spanned the stages: its
    run goes on as it started (each stage the whole schedule, 1024-token units)."""
    config = three_stage_config(tmp_path, steps=10, stages=AROUND_A_STAGE_MIXTURE)
    data = _prepared_mixture_data()
    old = Trainer(config, data)
    old.mixture_scope = "stage"  # as before
    _stage_loader_at(old, 1)
    old.save()
    state = torch.load(ckpt.checkpoint_path(tmp_path), weights_only=False)
    del state["mixture_scope"]
    torch.save(state, ckpt.checkpoint_path(tmp_path))
    old_second = _stage_loader_at(old, 6)
    resumed = Trainer(config, data)
    resumed.load_state_dict(ckpt.load_state(tmp_path))
    assert resumed.mixture_scope == "stage"
    second = _stage_loader_at(resumed, 6)
    assert second.schedule.weights_at(0.0) == pytest.approx([1.0, 0.0])
    assert second.settings == old_second.settings and second.settings["max_chunk_tokens"] == 1024
    for name, value in old.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_a_change_to_a_later_stage_does_not_move_the_current_stages_mixture(tmp_path):
    """The spans the run started with are kept in its checkpoint. Before: a resume in
    stage 0 with stage 2's seq_len changed (allowed: "from here on") recomputed the
    token shares, and stage 0's part of the schedule moved mid-stage (its end from
    alpha 0.5 to 0.66)."""
    config = three_stage_config(tmp_path, steps=10, stages=AROUND_A_STAGE_MIXTURE)
    data = _prepared_mixture_data()
    trainer = Trainer(config, data)
    _stage_loader_at(trainer, 1)
    trainer.save()
    longer = dataclasses.replace(AROUND_A_STAGE_MIXTURE[2], seq_len=48)
    changed = dataclasses.replace(config, stages=[*AROUND_A_STAGE_MIXTURE[:2], longer])
    assert ckpt.resume_conflicts(ckpt.saved_run(tmp_path), changed.to_dict()) == []
    resumed = Trainer(changed, data)
    resumed.load_state_dict(ckpt.load_state(tmp_path))
    assert resumed._loader.schedule.weights_at(1.0) == pytest.approx([0.5, 0.5])
    second = _stage_loader_at(resumed, 6)
    assert second.schedule.weights_at(0.0) == pytest.approx([0.5, 0.5])
    assert second.schedule.weights_at(1.0) == pytest.approx([0.0, 1.0])
    # a checkpoint of today's development, before the spans were kept: computed as now
    state = ckpt.load_state(tmp_path)
    del state["mixture_spans"]
    unkept = Trainer(changed, data)
    unkept.load_state_dict(state)
    first_share = 4 * 25 / (4 * 25 + 4 * 49)  # stage 0's tokens over both stages'
    assert unkept._loader.schedule.weights_at(1.0) == pytest.approx([1 - first_share, first_share])


def test_a_later_stage_that_loses_or_gains_its_own_mixture_takes_the_rest_of_the_schedule(
        tmp_path):
    """Before: the saved spans were restored for every stage. A later stage that lost its
    own mixture kept its unused (0, 1) and ran the prepared schedule again from alpha
    1.0; when one gained one, the stage after it kept its saved part, and the part in
    between was never read."""
    config = three_stage_config(tmp_path, steps=10, stages=AROUND_A_STAGE_MIXTURE)
    data = _prepared_mixture_data()
    trainer = Trainer(config, data)
    _stage_loader_at(trainer, 1)
    trainer.save()
    plain = dataclasses.replace(AROUND_A_STAGE_MIXTURE[1], mixture_start={})
    lost = dataclasses.replace(config, stages=[AROUND_A_STAGE_MIXTURE[0], plain,
                                               AROUND_A_STAGE_MIXTURE[2]])
    resumed = Trainer(lost, data)
    resumed.load_state_dict(ckpt.load_state(tmp_path))
    assert resumed._loader.schedule.weights_at(1.0) == pytest.approx([0.5, 0.5])  # kept
    # stages 1 and 2 share the schedule's second half by their tokens (1 : 2)
    assert resumed.mixture_spans[1] == pytest.approx((0.5, 0.5 + 0.5 / 3))
    middle = _stage_loader_at(resumed, 4)
    assert middle.schedule.weights_at(0.0) == pytest.approx([0.5, 0.5])
    assert resumed.mixture_spans[2] == (pytest.approx(0.5 + 0.5 / 3), 1.0)

    all_plain = three_stage_config(tmp_path / "b", steps=10,
                                   stages=[AROUND_A_STAGE_MIXTURE[0], plain,
                                           AROUND_A_STAGE_MIXTURE[2]])
    trainer = Trainer(all_plain, data)
    _stage_loader_at(trainer, 1)
    trainer.save()
    gained = dataclasses.replace(all_plain, stages=list(AROUND_A_STAGE_MIXTURE))
    resumed = Trainer(gained, data)
    resumed.load_state_dict(ckpt.load_state(tmp_path / "b"))
    assert resumed.mixture_spans[0] == pytest.approx((0.0, 0.4))  # kept, mid-stage
    assert resumed.mixture_spans[2] == (pytest.approx(0.4), 1.0)  # not its saved (0.6, 1)


def test_a_dpo_stage_too_long_for_the_data_is_refused_before_any_step(tmp_path):
    """Pairs need a document holding a prompt and its continuation: before, data too
    short stopped the run when the DPO stage started, after the earlier stages trained,
    with nothing saved and no stage named."""
    data = TrainData.from_corpus(synthetic_corpus(docs=2, doc_len=40), val_fraction=0.0)
    config = three_stage_config(tmp_path / "run")  # DPO at seq_len 16: 16-token windows
    Trainer(config, data)  # documents of 40 tokens: enough
    config = dataclasses.replace(config, stages=[
        *config.stages[:2], dataclasses.replace(config.stages[2], seq_len=64)])
    with pytest.raises(ValueError, match=r"stage 'preference' \(stages\.2\): no domain has a "
                                         r"document of 64 tokens for a preference pair"):
        Trainer(config, data)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mixture", [dict(mixture_start={"beta": 1.0}),
                                     dict(mixture_start={"alpha": 1.0}, mixture_end={"beta": 1.0})])
def test_a_dpo_mixture_of_no_domain_with_pairs_is_refused_before_any_step(tmp_path, mixture):
    """Only alpha's documents hold a pair at seq_len 16: a DPO mixture weighing none of
    them, at either end, stopped the run when the stage came to draw, naming neither."""
    import numpy as np

    from dsv3.data.tokenizer import TokenizedCorpus
    corpus = synthetic_corpus(docs=4, doc_len=60)
    short_docs = np.arange(1, 51, dtype=np.uint32).reshape(5, 10)
    short_docs[:, -1] = 0  # each ends with the end-of-text id
    tokens = {"alpha": corpus.tokens["alpha"], "beta": short_docs.ravel()}
    offsets = {"alpha": corpus.offsets["alpha"], "beta": np.arange(0, 51, 10, dtype=np.int64)}
    data = TrainData.from_corpus(TokenizedCorpus(tokens, offsets, eos_id=0, vocab_size=64),
                                 val_fraction=0.0)
    config = three_stage_config(tmp_path / "run")
    pairs_from = dataclasses.replace(config.stages[2], mixture_start={"alpha": 1.0})
    Trainer(dataclasses.replace(config, stages=[*config.stages[:2], pairs_from]), data)
    config = dataclasses.replace(config, stages=[
        *config.stages[:2], dataclasses.replace(config.stages[2], **mixture)])
    name = "mixture_end" if "mixture_end" in mixture else "mixture_start"
    with pytest.raises(ValueError, match=rf"stage 'preference' \(stages\.2\): its {name} gives "
                                         rf"no weight to a domain with preference pairs"):
        Trainer(config, data)
