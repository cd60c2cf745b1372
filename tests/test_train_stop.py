"""Stopping a run on Ctrl-C or SIGTERM (dsv3/train/stop.py): the run saves its regular
checkpoint at the next step boundary and stops; the resume reaches the same weights,
bit for bit, as the run that never stopped; a second Ctrl-C stops at once; the
previous handlers come back; `dsv3 train` exits with status 130 and says where the
checkpoint is. (Under DDP: tests/test_train_ddp.py.)"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import dsv3.train.stop as stop_module
from dsv3.cli import main
from dsv3.train import checkpoint as ckpt
from dsv3.train.stop import TrainingStopped
from dsv3.train.trainer import Trainer
from dsv3.train.config import StageConfig
from train_support import command_run, synthetic_data, three_stage_config


def signal_at(trainer, step, *signums):
    """``trainer`` sends itself ``signums`` just before optimizer step ``step`` runs."""
    real = trainer.train_step

    def train_step(measure=False):
        if trainer.step == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return real(measure=measure)

    trainer.train_step = train_step
    return trainer


def assert_same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), f"{name} differs"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_at_the_next_step_and_the_resume_is_exact(tmp_path, signum):
    """Before: KeyboardInterrupt mid-step, nothing saved (save_every = 0)."""
    data = synthetic_data()
    straight = Trainer(three_stage_config(tmp_path / "straight"), data)
    straight.train(progress=False)
    config = three_stage_config(tmp_path / "stopped")
    handlers = {s: signal.getsignal(s) for s in stop_module.STOP_SIGNALS}
    with pytest.raises(TrainingStopped) as stopped:
        signal_at(Trainer(config, data), 9, signum).train(progress=False)
    # the signal came during step 10 (index 9), in the curriculum stage: saved after it
    assert (stopped.value.step, stopped.value.signal_name) == (10, signal.Signals(signum).name)
    assert ckpt.saved_run(config.out_dir)["step"] == 10
    assert not (tmp_path / "stopped" / "final").exists()  # not finished: nothing exported
    assert {s: signal.getsignal(s) for s in stop_module.STOP_SIGNALS} == handlers
    resumed = Trainer(config, data)
    resumed.train(progress=False)
    assert resumed.step == 20
    assert_same_weights(straight.model, resumed.model)


def test_a_second_ctrl_c_stops_at_once(tmp_path, monkeypatch):
    """The old behaviour on the second Ctrl-C: KeyboardInterrupt, nothing saved. The
    same Ctrl-C delivered twice at once (torchrun forwards its own) is one request."""
    data = synthetic_data()
    config = three_stage_config(tmp_path)
    with pytest.raises(TrainingStopped):  # two at once: one request
        signal_at(Trainer(config, data), 2, signal.SIGINT, signal.SIGINT).train(progress=False)
    assert ckpt.saved_run(tmp_path)["step"] == 3
    monkeypatch.setattr(stop_module, "REPEAT_WINDOW_S", 0.0)
    with pytest.raises(KeyboardInterrupt) as raised:
        signal_at(Trainer(config, data), 5, signal.SIGINT, signal.SIGINT).train(progress=False)
    assert type(raised.value) is KeyboardInterrupt  # not TrainingStopped: no save
    assert ckpt.saved_run(tmp_path)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_on_the_last_step_finishes_the_run(tmp_path):
    config = three_stage_config(tmp_path, steps=4, stages=[StageConfig("base", seq_len=24)])
    signal_at(Trainer(config, synthetic_data()), 3, signal.SIGTERM).train(progress=False)
    assert (tmp_path / "final" / "model.pt").is_file()


# The `dsv3 train` process of the command test, its steps slowed (not changed) so that
# the test's SIGINT lands mid-run.
SLOW_TRAIN = """
import sys, time
import dsv3.train.trainer as trainer
real = trainer.Trainer.train_step
def train_step(self, measure=False):
    time.sleep(0.15)
    return real(self, measure)
trainer.Trainer.train_step = train_step
from dsv3.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _command(tmp_path, out) -> list[str]:
    return command_run(tmp_path) + ["--out", str(out)]


def test_ctrl_c_in_dsv3_train_exits_130_with_a_checkpoint_to_resume(tmp_path, capsys):
    command = _command(tmp_path, tmp_path / "stopped")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, *command], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.is_file() and metrics.read_text().strip()):  # step 5 logged
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    step = ckpt.saved_run(tmp_path / "stopped")["step"]
    assert 5 <= step < 20
    last = err.strip().splitlines()[-1]
    assert last == (f"dsv3 train: stopped by SIGINT at step {step} of 20; checkpoint saved in "
                    f"{tmp_path / 'stopped' / 'checkpoint'}; run the same command again to "
                    f"resume from step {step} (--no-resume starts over)"), err
    assert out == ""  # no summary: the run did not finish
    assert main(command) == 0  # the same command resumes and finishes
    assert f"checkpoint at step {step}: resuming there" in capsys.readouterr().err
    assert main(_command(tmp_path, tmp_path / "straight")) == 0
    resumed = torch.load(tmp_path / "stopped" / "final" / "model.pt")
    straight = torch.load(tmp_path / "straight" / "final" / "model.pt")
    for name, weight in straight.items():
        assert torch.equal(weight, resumed[name]), f"{name} differs after the resume"
    steps = [json.loads(line)["step"] for line in metrics.open()]
    assert steps == [5, 10, 15, 20]  # each step logged once


def test_help_and_the_demo_config_name_save_every(capsys):
    from dsv3.train.config import load_config
    assert load_config("demo").save_every == 100
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "save_every" in text and "Ctrl-C" in text and "status 130" in text
