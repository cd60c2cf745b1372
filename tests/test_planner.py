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
from dsv3.train.planner import activation_bytes_per_token, gpus_needed, parameter_counts, plan


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
def test_activation_estimate_matches_saved_bytes(name, overrides, mode):
    config = dataclasses.replace(preset(name), **overrides)
    model = Transformer(config).train()
    model.set_checkpointing(mode)
    batch, seq = 2, 64
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1))
    counter = [0]
    with saved_activation_bytes(counter, model):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    estimate = activation_bytes_per_token(config, seq, mode, 4, recompute_peak=False) * batch * seq
    assert abs(estimate / counter[0] - 1) < 0.05, (estimate, counter[0])


def test_gpu_count_and_sharding():
    config = preset("deepseek-v3")
    settings = dict(micro_batch=1, seq_len=4096, precision="bf16", checkpointing="full")
    dense = plan(config, gpus=64, gpu_mem_gb=80, **settings)
    zero3 = plan(config, gpus=64, gpu_mem_gb=80, zero=3, **settings)
    assert zero3.weights_gb < dense.weights_gb and zero3.optimizer_gb < dense.optimizer_gb
    ddp = plan(config, gpus=64, gpu_mem_gb=80, strategy="ddp", **settings)
    assert ddp.weights_gb == pytest.approx(parameter_counts(config)["total"] * 4 / 1e9)
    needed = gpus_needed(config, 80, zero=3, **settings)
    assert needed is not None and not plan(config, gpus=needed // 2, gpu_mem_gb=80, zero=3,
                                           **settings).fits
    assert plan(config, gpus=needed, gpu_mem_gb=80, zero=3, **settings).fits
    with pytest.raises(ValueError, match="strategy must be"):
        plan(config, gpus=8, gpu_mem_gb=80, strategy="tp", **settings)
    for memory in (0, -80, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="gpu_mem_gb must be positive and finite"):
            plan(config, gpus=8, gpu_mem_gb=memory, **settings)


def test_plan_command(capsys):
    assert main(["plan", "--set", "model=small", "--gpus", "2", "--gpu-mem", "16GB"]) == 0
    out = capsys.readouterr().out
    assert "parameters (total / active)" in out and "GPUs needed" in out
    assert main(["plan", "--set", "model=small", "--gpu-mem", "16GiB"]) == 0
    assert "x 16GiB" in capsys.readouterr().out  # the size as the user wrote it


def test_plan_vocab_size_is_applied(capsys):
    totals = []
    for vocab in ("1000", "1000000"):  # 64 x 2 x 999000 parameters apart: shows at 0.001B
        assert main(["plan", "--set", "model=tiny", "--vocab-size", vocab]) == 0
        totals.append(capsys.readouterr().out.splitlines()[0])
    assert totals[0] != totals[1]


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
