"""dsv3.train.planner against what the model really has and saves: exact parameter
counts, and activation estimates within 5% of the bytes autograd saves (measured
with the trainer's counter) on the small presets, for every checkpointing mode;
the GPU count, ZeRO sharding and the command's output; its options are checked."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dsv3.cli import main
from dsv3.model import Transformer, preset
from dsv3.train.metrics import saved_activation_bytes
from dsv3.train.planner import (activation_bytes_per_token, expert_parallel_size, gpus_needed,
                                parameter_counts, plan)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_parameter_counts_are_exact(name):
    config = preset(name)
    model = Transformer(config)
    counts = parameter_counts(config)
    assert counts["total"] == model.num_parameters()
    assert counts["active"] == model.num_parameters(active=True)


@pytest.mark.parametrize("name, overrides", [
    ("tiny", {}),
    ("small", dict(n_layers=3)),  # 3 of its 6 layers keep the test quick
    ("tiny", dict(n_kv_heads=2, dense_ffn_dim=128)),  # grouped-query attention, other FFN
])
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.parametrize("dtype_bytes", [4, 2])
def test_activation_estimate_matches_saved_bytes(name, overrides, mode, dtype_bytes):
    """bf16 too (dtype_bytes 2, under autocast): the residual stream and the norms stay
    fp32 there, which the planner priced at 2 B (under full checkpointing it gave 54%
    of what autograd saved). The counter leaves out autocast's weight copies, which
    the planner counts with the weights: they were counted as activations."""
    config = dataclasses.replace(preset(name), **overrides)
    model = Transformer(config).train()
    model.set_checkpointing(mode)
    batch, seq = 2, 64
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1))
    counter = [0]
    with saved_activation_bytes(counter, model), torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=dtype_bytes == 2):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    estimate = activation_bytes_per_token(config, seq, mode, dtype_bytes,
                                          recompute_peak=False) * batch * seq
    assert abs(estimate / counter[0] - 1) < 0.05, (estimate, counter[0])


def test_gpu_count_and_sharding():
    config = preset("deepseek-v3")
    settings = dict(micro_batch=1, seq_len=4096, precision="bf16", checkpointing="full")
    dense = plan(config, gpus=64, gpu_mem_gb=80, **settings)
    zero3 = plan(config, gpus=64, gpu_mem_gb=80, zero=3, **settings)
    assert zero3.weights_gb < dense.weights_gb and zero3.optimizer_gb < dense.optimizer_gb
    ddp = plan(config, gpus=64, gpu_mem_gb=80, strategy="ddp", **settings)
    # bf16: the fp32 master and autocast's bf16 copy, 6 B per parameter
    assert ddp.weights_gb == pytest.approx(parameter_counts(config)["total"] * 6 / 1e9)
    needed = gpus_needed(config, 80, zero=3, **settings)
    assert needed is not None and not plan(config, gpus=needed // 2, gpu_mem_gb=80, zero=3,
                                           **settings).fits
    assert plan(config, gpus=needed, gpu_mem_gb=80, zero=3, **settings).fits
    with pytest.raises(ValueError, match="strategy must be"):
        plan(config, gpus=8, gpu_mem_gb=80, strategy="tp", **settings)
    for memory in (0, -80, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="gpu_mem_gb must be positive and finite"):
            plan(config, gpus=8, gpu_mem_gb=memory, **settings)


@pytest.mark.parametrize("setting, message", [
    (dict(precision="fp8"), "precision must be one of"),  # was priced as bf16, silently
    (dict(checkpointing="ful"), "checkpointing must be one of"),  # was a bare KeyError
    (dict(micro_batch=0), "micro_batch must be >= 1, got 0"),  # was 0 GB of activations
    (dict(dpo_seq_len=1), "dpo_seq_len must be >= 2, got 1"),  # no input token to a row
])
def test_plan_refuses_bad_settings_by_name(setting, message):
    settings = {**dict(gpus=2, gpu_mem_gb=80, micro_batch=1, seq_len=64), **setting}
    with pytest.raises(ValueError, match=message):
        plan(preset("small"), **settings)


def test_expert_parallel_prices_whole_experts():
    config = preset("small")  # 16 experts, 5 MoE layers
    counts = parameter_counts(config)
    per_expert = 3 * config.moe.ffn_dim * config.dim
    moe_layers = config.n_layers - config.n_dense_layers
    dense = counts["total"] - counts["experts"]
    settings = dict(micro_batch=1, seq_len=64, precision="fp32")
    # 32 GPUs: a 16-way expert group (not 32 half-experts) x 2 replicas, one expert a layer each
    wide = plan(config, gpus=32, gpu_mem_gb=80, **settings)
    assert wide.expert_parallel == 16 and wide.layout() == "16-way expert x 2-way data"
    assert wide.weights_gb == pytest.approx((dense + moe_layers * per_expert) * 4 / 1e9)
    # 3 GPUs with room: all three replicate the 16 experts (no whole 2-way groups on 3)
    odd = plan(config, gpus=3, gpu_mem_gb=80, **settings)
    assert odd.expert_parallel == 1 and odd.buildable
    assert odd.weights_gb == pytest.approx(counts["total"] * 4 / 1e9)
    # where only the widest split fits: the largest divisor of 16 that is <= 3, a 2-way
    # group of 8 experts a GPU, one GPU left over
    tight_gb = _held_gb(plan(config, gpus=2, gpu_mem_gb=80, **settings)) / 0.9
    tight = plan(config, gpus=3, gpu_mem_gb=tight_gb, **settings)
    assert expert_parallel_size(config, 3) == 2 and tight.expert_parallel == 2 and tight.fits
    assert tight.weights_gb == pytest.approx((dense + counts["experts"] / 2) * 4 / 1e9)
    assert not tight.buildable  # 3 GPUs are no whole number of 2-way groups
    six = dataclasses.replace(config, moe=dataclasses.replace(config.moe, n_experts=6))
    assert not plan(six, gpus=4, gpu_mem_gb=1e-3, **settings).buildable  # a 3-way group on 4
    assert gpus_needed(six, 1e-3, max_gpus=4, **settings) is None


def _held_gb(p) -> float:
    return p.weights_gb + p.gradients_gb + p.optimizer_gb + p.activations_gb["none"]


def test_plan_uses_every_gpu_where_that_fits():
    """12 GPUs, 16 experts: 4-way expert x 3-way data uses them all; before, the plan
    priced the widest split, 8 x 1, and left 4 GPUs idle even where 4 x 3 fits."""
    config = preset("small")
    settings = dict(micro_batch=1, seq_len=64, precision="fp32")
    roomy = plan(config, gpus=12, gpu_mem_gb=80, **settings)
    assert roomy.fits and roomy.buildable and roomy.layout() == "4-way expert x 3-way data"
    # between what the 8-way and the 4-way splits hold a GPU: only 8 of the 12 take it
    eight_gb = _held_gb(plan(config, gpus=8, gpu_mem_gb=80, **settings))
    assert eight_gb < _held_gb(roomy)
    tight = plan(config, gpus=12, gpu_mem_gb=(eight_gb + _held_gb(roomy)) / 2 / 0.9, **settings)
    assert tight.fits and tight.layout() == "8-way expert x 1-way data (+4 GPUs left over)"
    # nothing fits: the widest split, the least a GPU can hold, shows how far off it is
    short = plan(config, gpus=12, gpu_mem_gb=eight_gb / 2, **settings)
    assert not short.fits and short.expert_parallel == 8
    assert _held_gb(short) == pytest.approx(eight_gb)
    # a dense model has no experts to split
    dense = dataclasses.replace(config, moe=None)
    assert plan(dense, gpus=12, gpu_mem_gb=80, **settings).layout() == "1-way expert x 12-way data"


def test_gpus_needed_finds_whole_expert_groups_of_any_size():
    """6 experts split 3 or 6 ways: on the powers of two searched before, 4 GPUs hold a
    3-way group and 8 a 6-way one, each with GPUs left over, so a config that fits on 3
    GPUs was said to need more than 4096."""
    config = preset("small")
    six = dataclasses.replace(config, moe=dataclasses.replace(config.moe, n_experts=6))
    settings = dict(micro_batch=1, seq_len=64, precision="fp32", checkpointing="full")
    on_three = plan(six, gpus=3, gpu_mem_gb=1, **settings)
    on_two = plan(six, gpus=2, gpu_mem_gb=1, **settings)
    used = [p.weights_gb + p.gradients_gb + p.optimizer_gb + p.activations_gb["full"]
            for p in (on_three, on_two)]
    memory = (used[0] + used[1]) / 2 / 0.9  # fits 3 GPUs' share, not 2 GPUs'
    assert gpus_needed(six, memory, **settings) == 3
    assert plan(six, gpus=3, gpu_mem_gb=memory, **settings).layout() == "3-way expert x 1-way data"
    # plain data parallelism holds no expert groups: its counts stay powers of two
    assert gpus_needed(six, 1e3, strategy="ddp", **settings) == 1


def test_all_to_all_traffic_counts_the_checkpointed_replay():
    """Under checkpointing the block's forward runs again in the backward, its dispatch
    and combine too: 6 exchanges a layer, not 4 (measured: 378 rows sent against 252
    in a two-rank run of an expert-parallel MoE under torch.utils.checkpoint)."""
    config = preset("small")
    settings = dict(gpus=8, gpu_mem_gb=80, micro_batch=2, seq_len=64)
    plain = plan(config, checkpointing="none", **settings).alltoall_gb
    tokens, ep = 2 * 64, expert_parallel_size(config, 8)
    want = (4 * (config.n_layers - config.n_dense_layers) * tokens * config.moe.top_k
            * config.dim * 2 * (ep - 1) / ep / 1e9)
    assert plain == pytest.approx(want)
    for mode in ("full", "selective"):
        assert plan(config, checkpointing=mode, **settings).alltoall_gb == pytest.approx(
            1.5 * plain)


def test_zero3_prices_the_weight_all_gathers():
    """ZeRO-3 gathers the sharded weights for each micro-batch's forward and backward
    ((N-1)/N of them each time, in the compute dtype), a DPO step also its fp32
    reference's; stages 0-2 gather no weights."""
    config = preset("small")
    settings = dict(gpus=8, gpu_mem_gb=80, micro_batch=2, seq_len=64, grad_accum=3)
    counts = parameter_counts(config)
    replicated = counts["total"] - counts["experts"]  # under "ep" the experts are not sharded
    assert all(plan(config, zero=stage, **settings).allgather_gb == 0 for stage in (0, 1, 2))
    zero3 = plan(config, zero=3, **settings)
    assert zero3.allgather_gb == pytest.approx(7 / 8 * replicated * 2 * 2 * 3 / 1e9)
    assert "ZeRO-3 weight gathers per step" in zero3.table()
    assert "weight gathers" not in plan(config, zero=2, **settings).table()
    fp32 = plan(config, zero=3, precision="fp32", strategy="ddp", **settings)
    assert fp32.allgather_gb == pytest.approx(7 / 8 * counts["total"] * 4 * 2 * 3 / 1e9)
    dpo = plan(config, zero=3, dpo_seq_len=32, **settings)
    assert dpo.allgather_gb == pytest.approx(7 / 8 * replicated * (2 * 2 + 4) * 3 / 1e9)


def test_deepseek_v3_experts_shard_at_most_256_ways(capsys):
    # the command's defaults (fp32, micro-batch 8 x 128, no checkpointing), ZeRO-3: 256 experts
    # shard at most 256 ways, so 1024 GPUs still hold one expert a layer each and do not fit
    config = preset("deepseek-v3")
    settings = dict(micro_batch=8, seq_len=128, precision="fp32", checkpointing="none", zero=3)
    wide = plan(config, gpus=1024, gpu_mem_gb=80, **settings)
    assert wide.layout() == "256-way expert x 4-way data"
    total = wide.weights_gb + wide.gradients_gb + wide.optimizer_gb + wide.activations_gb["none"]
    assert total == pytest.approx(92.6, abs=0.1) and not wide.fits
    assert gpus_needed(config, 80, **settings) is None
    assert not plan(config, gpus=4096, gpu_mem_gb=80, **settings).fits
    assert main(["plan", "--set", "model=deepseek-v3", "--gpus", "256", "--zero", "3"]) == 0
    out = capsys.readouterr().out
    assert "more than 4096 x 80GB (ep: experts split at most 256 ways, ZeRO-3)" in out
    # what no GPU count helps: a GPU's own activations, and the modes that shrink them
    assert "a GPU holds 51.5 GB of activations (checkpointing=none, micro_batch=8)" in out
    assert "selective 32.5 GB, full 3.3 GB (--set checkpointing=...)" in out
    assert main(["plan", "--set", "model=deepseek-v3", "--set", "checkpointing=full",
                 "--gpus", "256", "--zero", "3"]) == 0
    assert "GPUs needed                      256 x 80GB" in capsys.readouterr().out
    assert main(["plan", "--set", "model=deepseek-v3", "--zero", "0"]) == 0
    assert "weights, gradients and optimizer state, over the 72.0 GB usable before its " \
        "51.5 GB of activations: a higher --zero stage" in capsys.readouterr().out


def test_what_never_fits_offers_no_step_past_zero_3_nor_experts_under_ddp(capsys):
    """At ZeRO-3 the advice was "a higher --zero stage", which there is none of; under
    ddp the line said "experts split at most 1 ways", though ddp splits none."""
    args = ["plan", "--set", "model=deepseek-v3", "--set", "checkpointing=full", "--zero", "3"]
    assert main([*args, "--gpu-mem", "16GB"]) == 0
    out = capsys.readouterr().out
    assert "more than 4096 x 16GB (ep: experts split at most 256 ways, ZeRO-3)" in out
    assert "higher --zero" not in out and "more memory a GPU" in out
    assert main([*args, "--gpu-mem", "2GB", "--strategy", "ddp"]) == 0
    out = capsys.readouterr().out
    assert "more than 4096 x 2GB (ddp: ZeRO-3)" in out and "experts split" not in out
    assert "higher --zero" not in out


@pytest.mark.parametrize("strategy, zero", [("ep", 0), ("ep", 3), ("ddp", 0)])
def test_mixed_precision_counts_the_autocast_weight_copy(strategy, zero):
    config = preset("small")
    settings = dict(gpus=4, gpu_mem_gb=80, micro_batch=2, seq_len=64, strategy=strategy, zero=zero)
    fp32 = plan(config, precision="fp32", **settings)
    for precision in ("bf16", "fp16"):
        mixed = plan(config, precision=precision, **settings)
        # fp32 master (4 B) + the low-precision copy (2 B) per parameter held: 1.5x fp32's
        assert mixed.weights_gb == pytest.approx(fp32.weights_gb * 6 / 4)
        assert (mixed.gradients_gb, mixed.optimizer_gb) == (fp32.gradients_gb, fp32.optimizer_gb)
    counts = parameter_counts(config)
    held = counts["total"] if strategy == "ddp" else (
        counts["total"] - counts["experts"] + counts["experts"] / 4)
    if zero == 0:  # fp32 unchanged: 4 B per parameter held
        assert fp32.weights_gb == pytest.approx(held * 4 / 1e9)


def test_plan_command(capsys):
    assert main(["plan", "--set", "model=small", "--gpus", "2", "--gpu-mem", "16GB"]) == 0
    out = capsys.readouterr().out
    assert "parameters (total / active)" in out and "GPUs needed" in out
    assert main(["plan", "--set", "model=small", "--gpu-mem", "16GiB"]) == 0
    assert "x 16GiB" in capsys.readouterr().out  # the size as the user wrote it


def test_plan_vocab_size_is_applied(capsys):
    totals = []
    for vocab in ("1000", "1000000"):  # 64 x 2 x 999000 parameters apart
        assert main(["plan", "--set", "model=tiny", "--vocab-size", vocab]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == f"vocabulary                       {vocab} (--vocab-size)"
        totals.append(lines[1])
    assert totals == ["parameters (total / active)      510K / 289K",
                      "parameters (total / active)      128M / 128M"]


def test_plan_takes_the_prepared_tokenizers_vocabulary(tmp_path, capsys, monkeypatch):
    """`dsv3 train` builds its model with the tokenizer's vocabulary, whatever the preset
    says; plan used the preset's (the demo's 2048 against its tokenizer's 8192)."""
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "manifest.json").write_text('{"vocab_size": 8192, "eos_id": 0}')
    assert main(["plan", "--config", "demo", "--set", f"data_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"vocabulary                       8192 (the tokenizer in {tmp_path})")
    assert main(["plan", "--config", "demo", "--set", f"data_dir={tmp_path / 'none'}"]) == 0
    assert capsys.readouterr().out.startswith(
        "vocabulary                       2048 (the preset's)")
    assert main(["plan", "--config", "demo", "--set", f"data_dir={tmp_path}",
                 "--set", "model_overrides.vocab_size=300"]) == 0
    # planned as asked (a what-if), with the warning that train refuses it against this data
    assert (f"300 (model_overrides.vocab_size; dsv3 train would refuse it: the tokenizer "
            f"in {tmp_path} has 8192)") in capsys.readouterr().out
    assert main(["plan", "--config", "demo", "--set", f"data_dir={tmp_path}",
                 "--set", "model_overrides.vocab_size=8192"]) == 0
    assert "8192 (model_overrides.vocab_size)\n" in capsys.readouterr().out
    # a bare preset is planned as the preset, whatever ./out/data holds
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "data" / "tokens").mkdir(parents=True)
    (tmp_path / "out" / "data" / "tokens" / "manifest.json").write_text('{"vocab_size": 64}')
    assert main(["plan", "--set", "model=deepseek-v3"]) == 0
    assert capsys.readouterr().out.startswith("vocabulary                       129280 (the "
                                              "preset's)")


@pytest.mark.parametrize("option, value, expected", [
    ("--gpu-mem", "lots", "expected a size like 80GB"),
    ("--gpu-mem", "..GB", "expected a size like 80GB"),
    ("--gpu-mem", "1.2.3GB", "expected a size like 80GB"),
    ("--gpu-mem", "0GB", "size '0GB' must be > 0"),
    ("--gpu-mem", "0.0", "size '0.0' must be > 0"),
    ("--gpu-mem", "9" * 400 + "GB", "size '" + "9" * 400 + "GB' must be finite"),  # inf
    ("--gpus", "0", "value must be >= 1, got 0"),
    ("--gpus", "-2", "value must be >= 1, got -2"),
    ("--gpus", "two", "value must be a whole number, got 'two'"),
    ("--vocab-size", "0", "value must be >= 1, got 0"),  # was taken as "not given"
    ("--vocab-size", "-5", "value must be >= 1, got -5"),
    ("--zero", "4", "invalid choice"),
])
def test_plan_rejects_bad_options(capsys, option, value, expected):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {expected}" in err and value[:40] in err


def test_a_dpo_stage_plans_its_doubled_rows_and_its_reference_model(tmp_path, capsys):
    """Chosen and rejected rows (2 x micro_batch, seq_len - 1 input tokens) through the
    policy, within 5% of what the trainer's DPO step saves, and the frozen reference's
    fp32 weights (4 B per parameter; autocast caches no copy of frozen weights)."""
    from dsv3.train.config import StageConfig
    from dsv3.train.trainer import Trainer
    from train_support import VOCAB, synthetic_data, three_stage_config
    config = three_stage_config(tmp_path, steps=4, log_every=1, stages=[
        StageConfig("base", "lm", 0.5, seq_len=32), StageConfig("pref", "dpo", 0.5, seq_len=32)])
    model = dataclasses.replace(config.model_config(), vocab_size=VOCAB)  # the trainer's
    settings = dict(gpus=1, gpu_mem_gb=80, micro_batch=config.micro_batch, seq_len=32,
                    precision="fp32", checkpointing="none", strategy="ddp")
    lm, dpo = plan(model, **settings), plan(model, dpo_seq_len=32, **settings)
    assert lm.reference_gb == 0
    assert dpo.reference_gb == pytest.approx(parameter_counts(model)["total"] * 4 / 1e9)
    trainer = Trainer(config, synthetic_data())
    records = [trainer.train_step(measure=True) for _ in range(4)]
    measured = records[-1]["activation_mb"] * 2**20 / 1e9  # a DPO step
    assert abs(dpo.activations_gb["none"] / measured - 1) < 0.05, (dpo.activations_gb, measured)
    assert dpo.activations_gb["none"] > 1.8 * lm.activations_gb["none"]
    # the memory that decides whether it fits includes both
    total = dpo.weights_gb + dpo.gradients_gb + dpo.optimizer_gb + dpo.activations_gb["none"]
    assert not plan(model, dpo_seq_len=32, **dict(settings, gpu_mem_gb=total / 0.9)).fits
    # the command reads the DPO stage from the config
    assert main(["plan", "--config", "dsv3/train/configs/demo.toml"]) == 0
    assert "DPO reference model per GPU" in capsys.readouterr().out


def test_parameter_counts_pick_their_unit_after_rounding():
    """999.6M printed as 1e+03M: the unit was picked before the rounding."""
    from dsv3.train.planner import _count
    assert [_count(n) for n in (0, 512, 999_999, 1_430_000, 999.6e6, 37.5e9, 999.7e9)] == \
        ["0", "512", "1M", "1.43M", "1B", "37.5B", "1T"]


def test_a_dpo_steps_reference_exchanges_are_never_replayed():
    """The reference model's forward (eval mode, no backward) is never checkpointed:
    its two exchanges a layer stay two under checkpointing, beside the policy's 4 or 6
    (before, the whole DPO traffic took the 1.5x: 9 instead of 8)."""
    config = preset("small")
    settings = dict(gpus=8, gpu_mem_gb=80, micro_batch=2, seq_len=64, dpo_seq_len=1025)
    plain = plan(config, checkpointing="none", **settings).alltoall_gb
    for mode in ("full", "selective"):
        assert plan(config, checkpointing=mode, **settings).alltoall_gb == pytest.approx(
            plain * (6 + 2) / (4 + 2))
