"""dsv3.train: every stage runs and logs the monitoring panel; bf16 and fp16;
gradient accumulation equals one big batch; a resumed run continues the same
curve bit for bit; the report and the evaluation export; bad configs."""
import dataclasses
import json

import pytest
import torch

from conftest import assert_close
from dsv3.train.config import StageConfig, TrainConfig, load_config
from dsv3.train.schedule import lr_factor
from dsv3.train.trainer import Trainer
from train_support import synthetic_data, three_stage_config


def test_three_stages_log_the_panel_and_write_the_report(tmp_path):
    history = Trainer(three_stage_config(tmp_path), synthetic_data()).train(progress=False)
    assert [r["step"] for r in history] == [5, 10, 15, 20]
    assert [r["stage"] for r in history] == [0, 1, 2, 2]
    lm = [r for r in history if "loss" in r]
    assert lm[-1]["loss"] < lm[0]["loss"], "the loss must fall"
    dpo = history[-1]
    assert "dpo/reward_margin" in dpo and 0 <= dpo["dpo/reward_accuracy"] <= 1
    # Step 10 is 1/6 into the curriculum stage: 16 + 16/6 tokens, rounded down to 8s.
    assert history[1]["seq_len"] == 16
    panel = {k for r in history for k in r}
    for key in ("loss", "perplexity", "lr", "grad_norm", "param_norm", "loss_scale",
                "skipped_steps", "tokens_per_s", "mfu", "step_time_ms", "data_time_share",
                "peak_memory_mb", "activation_mb", "moe/aux_loss", "moe/z_loss",
                "moe/load_max_over_mean", "moe/load_cv", "moe/router_entropy",
                "moe/dropped_tokens", "moe/expert_bias_norm", "domain_share/alpha",
                "dpo/reward_margin", "dpo/reward_accuracy"):
        assert key in panel, f"{key} missing from the metrics"
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [5, 10, 15, 20]
    report = (tmp_path / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 2  # curves + expert heat map
    final = tmp_path / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["vocab_size"] == 64 and (final / "model.pt").is_file()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision(tmp_path, precision):
    config = three_stage_config(tmp_path, precision=precision, steps=10,
                                stages=[StageConfig("base", "lm", 1.0, seq_len=24)])
    trainer = Trainer(config, synthetic_data())
    history = trainer.train(progress=False)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    # fp32 master weights; fp16 keeps a dynamic loss scale, bf16 needs none.
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert (history[-1]["loss_scale"] > 1) == (precision == "fp16")


def _first_step_grads(trainer):
    grads = {}
    step = trainer.optimizer.step

    def capture(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
        return step(*args, **kwargs)

    trainer.optimizer.step = capture
    trainer.train_step()
    return grads


def test_accumulation_equals_one_big_batch(tmp_path):
    """2 micro-batches of 4 rows = 1 batch of 8 rows (the packed stream cuts the same
    rows either way); the aux loss is off, being a per-forward statistic."""
    moe = dict(dim=32, ffn_dim=32, n_experts=4, top_k=2, aux_loss_coef=0.0)
    base = three_stage_config(tmp_path, stages=[StageConfig("base", "lm", 1.0, seq_len=24)])
    overrides = dict(base.model_overrides, moe=moe)
    big = _first_step_grads(Trainer(dataclasses.replace(
        base, micro_batch=8, grad_accum=1, model_overrides=overrides), synthetic_data()))
    small = _first_step_grads(Trainer(dataclasses.replace(
        base, micro_batch=4, grad_accum=2, model_overrides=overrides), synthetic_data()))
    for name in big:
        assert_close(small[name], big[name], f"grad of {name}")


def test_resume_continues_the_same_run(tmp_path):
    """Stopped inside the DPO stage and resumed: the same parameters, bit for bit,
    and the same logged losses as the run that never stopped."""
    data = synthetic_data()
    straight = Trainer(three_stage_config(tmp_path / "a"), data)
    straight_history = straight.train(progress=False)

    first = Trainer(three_stage_config(tmp_path / "b"), data)
    for _ in range(16):  # steps 14-19 are the DPO stage
        first.train_step()
    first.save()
    resumed = Trainer(three_stage_config(tmp_path / "b"), data)
    resumed_history = resumed.train(progress=False)
    assert resumed.step == 20 and resumed.reference is not None
    for (name, a), b in zip(straight.model.state_dict().items(),
                            resumed.model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert resumed_history[-1]["dpo/reward_margin"] == straight_history[-1]["dpo/reward_margin"]


def test_a_fresh_run_replaces_a_stale_runs_metrics(tmp_path):
    config = three_stage_config(tmp_path, steps=10, stages=[StageConfig("base", "lm", 1.0,
                                                                        seq_len=24)])
    for _ in range(2):
        Trainer(config, synthetic_data()).train(resume=False, progress=False)
    steps = [json.loads(line)["step"]
             for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10]


def test_curriculum_sequence_length_warms_up():
    stage = StageConfig("c", "curriculum", 1.0, seq_len=128, seq_len_start=32)
    lengths = [Trainer.seq_len_at(stage, p / 10) for p in range(10)]
    assert lengths[0] == 32 and lengths[-1] == 112 and lengths == sorted(lengths)
    assert all(length % 8 == 0 for length in lengths)
    assert Trainer.seq_len_at(StageConfig("b", "lm", 1.0, seq_len=64), 0.5) == 64


def test_schedules():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(99, 100, 10, "cosine", min_ratio=0.1) == pytest.approx(0.1, abs=1e-3)
    assert lr_factor(50, 100, 10, "wsd", decay_fraction=0.2) == 1.0
    assert lr_factor(90, 100, 10, "wsd", min_ratio=0.0, decay_fraction=0.2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_factor(0, 10, 1, "linear")


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('steps = 50\nprecision = "bf16"\n[optim]\nlr = 0.01\n'
                    '[[stages]]\nname = "base"\nfraction = 1.0\nseq_len = 64\n')
    config = load_config(path, ["optim.lr=0.002", "stages.0.seq_len=32", "out_dir=x"])
    assert (config.steps, config.precision, config.optim.lr) == (50, "bf16", 0.002)
    assert config.stages[0].seq_len == 32 and config.out_dir == "x"


@pytest.mark.parametrize("raw, match", [
    (dict(stages=[dict(name="a", fraction=0.5)]), "stage fractions must sum to 1"),
    (dict(stages=[dict(name="p", kind="dpo")]), "the first stage cannot be dpo"),
    (dict(stages=[dict(name="a", kind="rlhf")]), "kind must be one of"),
    (dict(precision="fp8"), "precision must be one of"),
    (dict(checkpointing="some"), "checkpointing must be one of"),
    (dict(micro_batch=0), "micro_batch must be a positive int"),
    (dict(optim=dict(schedule="step")), "optim.schedule must be one of"),
    (dict(stages=[dict(name="c", kind="curriculum", seq_len=32, seq_len_start=64)]),
     "seq_len_start must be in"),
])
def test_bad_configs_name_the_field(raw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**raw)


def test_unknown_keys_and_domains(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("stepz = 3\n")
    with pytest.raises(ValueError, match=r"unknown config keys \['stepz'\]"):
        load_config(path)
    with pytest.raises(ValueError, match="--set expects key=value"):
        load_config(None, ["steps"])
    config = three_stage_config(tmp_path, stages=[
        StageConfig("base", "lm", 1.0, seq_len=24, mixture_start={"gamma": 1.0})])
    with pytest.raises(ValueError, match=r"unknown domains \['gamma'\]"):
        Trainer(config, synthetic_data()).train(progress=False)
