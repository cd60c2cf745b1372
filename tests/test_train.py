"""dsv3.train: every stage runs and logs the monitoring panel; bf16 and fp16;
gradient accumulation equals one big batch; a resumed run continues the same
curve bit for bit; the report and the evaluation export; bad configs and command
input refused up front, naming the setting; the command's summary."""
import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

from conftest import assert_close
from dsv3.cli import main
from dsv3.train.config import StageConfig, TrainConfig, apply_overrides, load_config
from dsv3.train.schedule import lr_factor
from dsv3.train.trainer import Trainer
from train_support import command_run as _command_run, saved_partway
from train_support import synthetic_data, three_stage_config


def test_three_stages_log_the_panel_and_write_the_report(tmp_path):
    history = Trainer(three_stage_config(tmp_path), synthetic_data()).train(progress=False)
    assert [r["step"] for r in history] == [5, 10, 15, 20]
    assert [r["stage"] for r in history] == [0, 1, 2, 2]
    lm = [r for r in history if "loss" in r]
    assert lm[-1]["loss"] < lm[0]["loss"], "the loss must fall"
    dpo = history[-1]
    assert "dpo/reward_margin" in dpo and 0 <= dpo["dpo/reward_accuracy"] <= 1
    # Step 10 is the curriculum stage's second of 6 steps, 1/5 of the way from its
    # first to its last: 16 + 16/5 tokens, rounded down to 8s.
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


@pytest.mark.parametrize("native", [True, False])
def test_half_precision_on_a_cpu_without_native_matmul_warns(tmp_path, monkeypatch, native):
    """bf16 autocast where torch has no native CPU bf16 matmul (AVX2): told, with the
    two measured rates; where it has one, nothing is said."""
    import dsv3.train.metrics as metrics_module
    monkeypatch.setattr(metrics_module, "native_cpu_half_matmul", lambda dtype: native)
    rates = {torch.bfloat16: 1.5e9, torch.float32: 90e9}
    measured = []

    def measure(device, dtype, size=1024):
        measured.append((dtype, size))
        return rates[dtype]
    monkeypatch.setattr(metrics_module, "measure_matmul_flops", measure)
    config = three_stage_config(tmp_path, precision="bf16", steps=2,
                                stages=[StageConfig("base", "lm", 1.0, seq_len=24)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(config, synthetic_data())
    slow = [str(w.message) for w in caught if "no native bf16 matmul" in str(w.message)]
    if native:
        assert slow == [] and trainer.peak_flops == 1.5e9
        assert measured == [(torch.bfloat16, 1024)]
    else:
        # MFU against fp32's rate (the expert GEMMs multiply fp32 copies: it read over
        # 100% against bf16's), and bf16's timed small (1024^3 took 13 s there)
        assert trainer.peak_flops == 90e9
        assert measured == [(torch.float32, 1024), (torch.bfloat16, 256)]
        assert slow == ["precision='bf16': this CPU has no native bf16 matmul (torch runs it "
                        "on AVX512 or AMX), and multiplies at 1.5 GFLOP/s in it against 90.0 "
                        "in fp32: precision='fp32' trains faster here"]


@pytest.mark.parametrize("saved, resumed", [("fp32", "fp16"), ("fp16", "fp32")])
def test_resume_under_another_precision(tmp_path, saved, resumed):
    """A run saved without a loss scale resumes under fp16 with a fresh one (and back)."""
    stages = [StageConfig("base", "lm", 1.0, seq_len=24)]
    first = Trainer(three_stage_config(tmp_path, precision=saved, steps=6, stages=stages),
                    synthetic_data())
    for _ in range(3):
        first.train_step()
    first.save()
    trainer = Trainer(three_stage_config(tmp_path, precision=resumed, steps=6, stages=stages),
                      synthetic_data())
    history = trainer.train(progress=False)
    assert trainer.step == 6 and torch.isfinite(torch.tensor(history[-1]["loss"]))
    assert (history[-1]["loss_scale"] > 1) == (resumed == "fp16")


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
    lengths = [Trainer.seq_len_at(stage, p / 9) for p in range(10)]  # progress 1: the last step
    assert lengths[0] == 32 and lengths[-1] == 128 and lengths == sorted(lengths)
    assert all(length % 8 == 0 for length in lengths)
    assert Trainer.seq_len_at(StageConfig("b", "lm", 1.0, seq_len=64), 0.5) == 64


def test_schedules():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(99, 100, 10, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(5, 6, 1, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(50, 100, 10, "wsd", decay_fraction=0.2) == 1.0
    # WSD decays over steps 80-99, each step lower, the last on the floor
    assert lr_factor(79, 100, 10, "wsd", min_ratio=0.0, decay_fraction=0.2) == 1.0
    assert lr_factor(89, 100, 10, "wsd", min_ratio=0.0, decay_fraction=0.2) == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, "wsd", 0.1, 0.2) == pytest.approx(0.1)
    assert lr_factor(9, 10, 0, "wsd", 0.1, 0.2) == pytest.approx(0.1)
    assert lr_factor(99, 100, 10, "wsd", min_ratio=0.0, decay_fraction=0.0) == 1.0  # no decay
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_factor(0, 10, 1, "linear")


def test_wsd_decays_only_after_the_warm_up():
    factors = [lr_factor(step, 100, 10, "wsd", 0.1, decay_fraction=1.0) for step in range(100)]
    assert factors[9] == 1.0 and factors[10] == pytest.approx(1 - 0.9 / 90)
    assert factors[10:] == sorted(factors[10:], reverse=True)
    assert factors[-1] == pytest.approx(0.1)


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
    (dict(seed=2**64), r"seed must be in \[-2\*\*63, 2\*\*64\)"),
    (dict(checkpointing="some"), "checkpointing must be one of"),
    (dict(micro_batch=0), "micro_batch must be >= 1, got 0"),
    (dict(optim=dict(schedule="step")), "optim.schedule must be one of"),
    (dict(stages=[dict(name="c", kind="curriculum", seq_len=32, seq_len_start=64)]),
     "seq_len_start must be in"),
    # only a curriculum stage warms its length up: elsewhere it was silently ignored
    (dict(stages=[dict(name="a", seq_len=64, seq_len_start=16)]),
     "stage 'a': seq_len_start is for kind 'curriculum' stages; this stage is 'lm'"),
    # the default 20-step warm-up over a 10-step run never reaches the peak lr
    (dict(steps=10), r"optim.warmup_steps=20 is not below the 10 language-modelling steps "
                     r"of steps=10 \(DPO stages excluded\).*lower optim.warmup_steps"),
    (dict(steps=30, stages=[dict(name="a", fraction=0.5),
                            dict(name="p", kind="dpo", fraction=0.5)]),
     "optim.warmup_steps=20 is not below the 15 language-modelling steps of steps=30"),
])
def test_bad_configs_name_the_field(raw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**raw)


@pytest.mark.parametrize("steps, fractions, expected", [
    (100, [0.29, 0.71], [29, 71]),  # 0.29 * 100 is 28.999999999999996 in floats
    (100, [0.57, 0.43], [57, 43]),
    (200, [0.7, 0.2, 0.1], [140, 40, 20]),
    (20, [0.4, 0.3, 0.3], [8, 6, 6]),
    (10, [1 / 3, 1 / 3, 1 / 3], [3, 4, 3]),  # the boundaries round: 3.33 -> 3, 6.67 -> 7
])
def test_stage_steps_round_each_stages_end(steps, fractions, expected):
    config = TrainConfig(steps=steps, optim=dict(warmup_steps=1), stages=[
        dict(name=f"s{i}", fraction=fraction) for i, fraction in enumerate(fractions)])
    assert config.stage_steps() == expected


def test_unknown_keys_and_domains(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("stepz = 3\n")
    with pytest.raises(ValueError, match=r"unknown config keys \['stepz'\]"):
        load_config(path)
    with pytest.raises(ValueError, match="--set expects key=value"):
        load_config(None, ["steps"])
    # a syntax error names the file (it was TOML's message alone); PyYAML's in one line
    path.write_text("steps = \n")
    with pytest.raises(ValueError, match=rf"config file {path}: invalid TOML \(Invalid value"):
        load_config(path)
    yaml_path = tmp_path / "bad.yaml"
    yaml_path.write_text("a: [\n")
    with pytest.raises(ValueError, match=rf"config file {yaml_path}: invalid YAML \([^\n]*\)$"):
        load_config(yaml_path)
    config = three_stage_config(tmp_path, stages=[
        StageConfig("base", "lm", 1.0, seq_len=24, mixture_start={"gamma": 1.0})])
    with pytest.raises(ValueError, match=r"unknown domains \['gamma'\]"):
        Trainer(config, synthetic_data()).train(progress=False)


# --- the `dsv3 train` / `dsv3 plan` command: bad input is refused up front, in one line ----

DEMO = "dsv3/train/configs/demo.toml"


@pytest.mark.parametrize("override, match", [
    ("optim.min_lr_ratio=-5", r"optim.min_lr_ratio must be in \[0, 1\], got -5"),
    ("optim.min_lr_ratio=3", r"optim.min_lr_ratio must be in \[0, 1\], got 3"),
    ("optim.decay_fraction=-1", r"optim.decay_fraction must be in \[0, 1\], got -1"),
    ("optim.weight_decay=-1", "optim.weight_decay must be >= 0, got -1"),
    ("optim.lr=NaN", "optim.lr must be finite, got nan"),
    ("optim.lr=abc", "optim.lr must be a number, got 'abc'"),
    ("optim.lr=0", "optim.lr must be > 0, got 0"),
    ("optim.warmup_steps=2.5", "optim.warmup_steps must be a whole number, got 2.5"),
    ("optim.grad_clip=Infinity", "optim.grad_clip must be finite, got inf"),
    ("optim.betas=[0.9, 1]", r"optim.betas\[1\] must be in \[0, 1\), got 1"),
    ("stages.0.lr_scale=-1", "stage 'base': lr_scale must be > 0, got -1"),
    ("stages.2.dpo_beta=0", "stage 'preference': dpo_beta must be > 0, got 0"),
    ('stages.1.mixture_end={"code": 0}', "stage 'domain': mixture_end needs a weight > 0"),
    ("stages.0.seq_len=64.5", "stage 'base': seq_len must be a whole number, got 64.5"),
    ("stages.0.fraction=0.6.1", "stage 'base': fraction must be a number, got '0.6.1'"),
])
def test_nonsense_settings_are_refused_naming_the_setting(override, match):
    with pytest.raises((ValueError, TypeError), match=match):
        load_config(DEMO, ["optim.schedule=wsd", override])


def test_a_stage_longer_than_the_model_is_refused_before_any_training(tmp_path, capsys):
    too_long = ["--set", "stages.1.seq_len=300", "--set", "stages.1.seq_len_start=290"]
    message = ("stage 'domain' (stages.1): seq_len=300 exceeds the model's max_seq_len=256")
    assert main(["plan", "--config", DEMO, *too_long]) == 2
    assert message in capsys.readouterr().err
    assert main(["train", "--config", DEMO, "--out", str(tmp_path / "run"), *too_long]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # a stage left without a step (0.6 of 1 step rounds to the first stage's 1)
    with pytest.raises(ValueError, match=r"stage 'domain' \(stages.1\): fraction=0.3 of steps=1 "
                                         r"is 0 optimizer steps"):
        load_config(DEMO, ["steps=1"])


def test_shipped_config_is_taken_by_name_and_a_missing_file_lists_them(tmp_path, monkeypatch):
    # From a pip install there is no dsv3/train/configs/demo.toml path to pass; the
    # name works as with `dsv3 data prepare --config demo`.
    monkeypatch.chdir(tmp_path)
    assert load_config("demo") == load_config(Path(__file__).parents[1] / DEMO)
    with pytest.raises(FileNotFoundError, match=r"--config: no such file 'demoo' "
                                                r"\(shipped configs: \['demo'\]\)"):
        load_config("demoo")
    (tmp_path / "demo").write_text("steps = 700\n")  # a file of that name is the user's
    assert load_config("demo").steps == 700


def test_set_overrides_edit_the_defaults_or_name_the_bad_override(capsys):
    config = load_config(None, ["stages.0.seq_len=32"])  # no --config: the default stage
    assert [(s.name, s.seq_len) for s in config.stages] == [("base", 32)]
    assert main(["plan", "--config", DEMO, "--set", "stages.9.seq_len=64"]) == 2
    err = capsys.readouterr().err
    assert err == ("dsv3 plan: error: --set 'stages.9.seq_len=64': '9' is not an index of "
                   "stages (a list of length 3; valid indices: 0 to 2)\n")
    for override, match in [("steps.x=1", "steps is 600, not a table or list"),
                            ("optim..lr=1", "--set expects key=value"),
                            ("stages.0.seqlen=64", r"stages.0: unknown keys \['seqlen'\]"),
                            ("model_overrides.dims=8", r"model_overrides: unknown keys \['dims'\]"),
                            ("optim=3", "optim must be a dict, got 3")]:
        with pytest.raises((ValueError, TypeError), match=match):
            load_config(DEMO, [override])


def test_moe_overrides_change_the_presets_moe_fields_they_name():
    """--set model_overrides.moe.top_k=4 replaced the preset's whole MoE config (an error
    for the fields it lacked: "missing 3 required positional arguments"), and a new
    dim had to restate the whole MoE config to match it."""
    tiny = load_config(DEMO, []).model_config().moe
    model = load_config(DEMO, ["model_overrides.moe.top_k=4"]).model_config()
    assert model.moe == dataclasses.replace(tiny, top_k=4)
    model = load_config(DEMO, ["model_overrides.dim=128"]).model_config()
    assert model.dim == model.moe.dim == 128 and model.moe.n_experts == tiny.n_experts
    model = load_config(DEMO, ["model_overrides.dim=128", "model_overrides.moe.ffn_dim=32"]
                        ).model_config()
    assert (model.moe.dim, model.moe.ffn_dim, model.moe.top_k) == (128, 32, tiny.top_k)
    for override, match in [("model_overrides.moe.topk=4",
                             r"model_overrides.moe: unknown keys \['topk'\]; known: \["),
                            ("model_overrides.moe.top_k=40",
                             r"model_overrides.moe: top_k=40 must be <= "),
                            ("model_overrides.moe.dim=32",
                             r"moe.dim=32 must equal dim=64")]:
        with pytest.raises(ValueError, match=match):
            load_config(DEMO, [override]).model_config()


def test_a_vocabulary_other_than_the_tokenizers_is_refused(tmp_path):
    """The model takes the tokenizer's vocabulary: an override of it was replaced
    without a word, and the run trained at another size than the user asked."""
    config = three_stage_config(tmp_path)
    config.model_overrides["vocab_size"] = 100
    with pytest.raises(ValueError, match=r"model_overrides.vocab_size=100: the model takes its "
                                         r"tokenizer's vocabulary, 64 in "):
        Trainer(config, synthetic_data())


def test_internal_errors_keep_their_traceback(monkeypatch):
    import dsv3.commands.train as train_command

    def broken(args):
        raise KeyError("a bug, not bad input")

    monkeypatch.setattr(train_command, "_train", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["train"])


@pytest.mark.parametrize("device, cuda", [("tpu", False), ("cuda", False), ("cuda:1", True)])
def test_an_unusable_device_is_named(tmp_path, capsys, monkeypatch, device, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(cuda))
    assert main(["train", "--out", str(tmp_path / "run"), "--device", device]) == 2
    available = "cpu, cuda, cuda:0" if cuda else "cpu"
    assert capsys.readouterr().err == (f"dsv3 train: error: --device {device!r} is not available "
                                       f"on this machine; available: {available}\n")


def test_out_and_data_are_paths_even_when_they_read_as_numbers(tmp_path, capsys, monkeypatch):
    """--out/--data are taken as given, not through --set's JSON parsing."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--out", "2024", "--data", "7", "--no-progress"]) == 2
    assert "data_dir: no mixture.json in '7'" in capsys.readouterr().err
    assert load_config(None, ["steps=50"], {"out_dir": "1e3"}).out_dir == "1e3"


def test_the_summary_reports_the_last_stages_own_loss(tmp_path, capsys):
    assert main(_command_run(tmp_path)) == 0
    summary = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert summary["first_logged_loss"] == {"stage": "base", "step": 5, "loss": records[0]["loss"]}
    assert summary["last_stage_loss"] == {"stage": "preference", "step": 20,
                                          "dpo/loss": records[-1]["dpo/loss"]}


def test_resuming_under_other_settings_says_which_and_what_to_do(tmp_path, capsys):
    command = saved_partway(tmp_path)
    assert main(command + ["--set", "steps=30", "--set", "stages.0.seq_len=32"]) == 2
    err = capsys.readouterr().err
    assert "holds a checkpoint of a run with other settings (steps: 20 -> 30; " \
           "stages.0.seq_len: 24 -> 32)" in err
    assert "--no-resume" in err and "--out NEW_DIR" in err
    # a later stage the run has not reached yet may still change
    assert check_resume_conflicts(tmp_path / "out", "stages.1.seq_len=40") == []


def check_resume_conflicts(out_dir, override):
    from dsv3.train.checkpoint import resume_conflicts, saved_run
    config = three_stage_config(out_dir)
    changed = apply_overrides(config.to_dict(), [override])
    return resume_conflicts(saved_run(out_dir), changed)


def test_a_resume_says_where_it_starts_and_what_changed(tmp_path, capsys):
    """Before: a run resumed with another learning rate said nothing of it."""
    assert main(saved_partway(tmp_path) + ["--set", "optim.lr=0.001"]) == 0
    err = capsys.readouterr().err
    assert "holds this run's checkpoint at step 3: resuming there, to step 20" in err
    assert "settings changed since it was saved (from here on): " in err
    assert "optim.lr: 0.003 -> 0.001" in err


def test_a_finished_run_started_again_trains_and_rewrites_nothing(tmp_path, capsys):
    """Before: `dsv3 train ... --set optim.lr=1e-3` after a finished run exited 0 having
    trained nothing, and rewrote the checkpoint's config to lr 1e-3 (as if trained so)."""
    command = _command_run(tmp_path)
    assert main(command) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    saved = {p: p.read_bytes() for p in [out / "checkpoint" / "state.pt",
                                         out / "final" / "model.pt"]}
    assert main(command + ["--set", "optim.lr=0.001"]) == 0
    err = capsys.readouterr().err
    assert "at step 20, all of its 20 steps: nothing to train" in err
    assert "(not applied): optim.lr: 0.003 -> 0.001" in err
    assert all(path.read_bytes() == data for path, data in saved.items())


def test_under_torchrun_a_finished_run_is_not_decided_by_one_rank_alone(tmp_path, capsys,
                                                                        monkeypatch):
    """Before: each rank decided "finished, nothing to train" from its own out_dir,
    before the process group; a rank whose disk had no checkpoint then waited in the
    group for one that had returned. Under torchrun every rank joins the group, and
    the trainer, once the ranks agree on the checkpoint, trains nothing."""
    import torch.distributed as dist

    from dsv3.train import checkpoint as ckpt
    command = _command_run(tmp_path)
    assert main(command) == 0
    out = tmp_path / "out"  # the finished run, as if saved by 2 processes
    state = torch.load(ckpt.checkpoint_path(out), weights_only=False)
    torch.save({**state, "world": 2}, ckpt.checkpoint_path(out))
    rank_file = ckpt.rank_path(out, 0, state["step"]).read_bytes()
    ckpt.rank_path(out, 1, state["step"]).write_bytes(rank_file)

    class JoinedTheGroup(Exception):
        pass

    def init_process_group(*args, **kwargs):
        raise JoinedTheGroup

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(JoinedTheGroup):
        main(command)


def test_starting_over_removes_the_old_models_evaluation(tmp_path, capsys):
    """Before: --no-resume kept OUT/eval, so the new run's report showed the old model's
    scores and the cloze schedule started at the old model's level."""
    command = _command_run(tmp_path)
    (tmp_path / "out" / "eval").mkdir(parents=True)
    (tmp_path / "out" / "eval" / "eval.json").write_text("{}")
    assert main(command + ["--no-resume"]) == 0
    assert not (tmp_path / "out" / "eval").exists()


def test_an_out_dir_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert main(["train", "--out", str(tmp_path / "afile"), "--no-progress"]) == 2
    assert "out_dir: " in capsys.readouterr().err


def test_a_finished_run_without_its_export_gets_it_back(tmp_path, capsys):
    """Killed between the last save and the export (or final/ deleted): the same command
    exports the model again, training nothing. Before, it returned at once."""
    command = _command_run(tmp_path)
    assert main(command) == 0
    state = (tmp_path / "out" / "checkpoint" / "state.pt").read_bytes()
    (tmp_path / "out" / "final" / "model.pt").unlink()
    capsys.readouterr()
    assert main(command) == 0
    assert (tmp_path / "out" / "final" / "model.pt").is_file()
    assert json.loads(capsys.readouterr().out)["steps"] == 20
    assert (tmp_path / "out" / "checkpoint" / "state.pt").read_bytes() == state


def test_a_resume_applies_the_configs_weight_decay_and_betas(tmp_path):
    """A resume reported changed optim.weight_decay / optim.betas as applied from there
    on, but loading the optimizer's state put the saved ones back."""
    from dsv3.train import checkpoint as ckpt
    from dsv3.train.config import OptimConfig
    trainer = Trainer(three_stage_config(tmp_path), synthetic_data())
    for _ in range(2):
        trainer.train_step()
    trainer.save()
    changed = three_stage_config(tmp_path, optim=OptimConfig(warmup_steps=1, weight_decay=0.02,
                                                             betas=(0.8, 0.9)))
    resumed = Trainer(changed, synthetic_data())
    resumed.load_state_dict(ckpt.load_state(resumed.out_dir))
    assert [(g["weight_decay"], g["betas"]) for g in resumed.optimizer.param_groups] == [
        (0.02, (0.8, 0.9)), (0.0, (0.8, 0.9))]
    # the moments came back with it
    saved, loaded = (t.optimizer.state_dict()["state"] for t in (trainer, resumed))
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k]["exp_avg"], loaded[k]["exp_avg"]) for k in saved)


def test_a_large_seed_reaches_the_dpo_stage():
    """Past a seed of about 7e7 the preference pairs' generator seed overflowed int64:
    the first DPO step stopped the run, after the earlier stages had trained."""
    from dsv3.train.data import preference_batch
    corpus = synthetic_data().train
    for seed in (10**8, 2**63 - 1):
        prompt, chosen, rejected = preference_batch(corpus, 2, 4, 4, seed=seed, step=5)
        assert prompt.shape == (2, 4) and chosen.shape == rejected.shape == (2, 4)
