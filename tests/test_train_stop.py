"""Stopping a run on Ctrl-C or SIGTERM (dsv3/train/stop.py): the run saves its regular
checkpoint at the next step boundary and stops; the resume reaches the same weights,
bit for bit, as the run that never stopped; a second Ctrl-C stops at once; the
previous handlers come back (an ignored signal stays ignored); a signal in the last
step or the export lets the run finish, and an export cut short is made again; `dsv3
train` exits with status 128 + the signal's number and says where the checkpoint is.
(Under DDP: tests/test_train_ddp.py.)"""
import copy
import json
import os
import pickle
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
from train_support import command_run, synthetic_data, three_stage_config, word_tokenizer


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
    # whatever was installed before (Python's default, or pyspark's after a Spark test)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingStopped):  # two at once: one request
        signal_at(Trainer(config, data), 2, signal.SIGINT, signal.SIGINT).train(progress=False)
    assert ckpt.saved_run(tmp_path)["step"] == 3
    monkeypatch.setattr(stop_module, "REPEAT_WINDOW_S", 0.0)
    with pytest.raises(KeyboardInterrupt) as raised:
        signal_at(Trainer(config, data), 5, signal.SIGINT, signal.SIGINT).train(progress=False)
    assert type(raised.value) is KeyboardInterrupt  # not TrainingStopped: no save
    assert ckpt.saved_run(tmp_path)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # put back on this exit path too


def test_a_signal_on_the_last_step_finishes_the_run(tmp_path):
    config = three_stage_config(tmp_path, steps=4, stages=[StageConfig("base", seq_len=24)])
    signal_at(Trainer(config, synthetic_data()), 3, signal.SIGTERM).train(progress=False)
    assert (tmp_path / "final" / "model.pt").is_file()


class SignalOnRead:
    """A held-out stream that sends this process SIGINT when the export reads it."""

    def __init__(self, tokens):
        self.tokens = tokens

    def tolist(self):
        os.kill(os.getpid(), signal.SIGINT)
        return self.tokens.tolist()


def _exporting_data(tmp_path):
    """The synthetic data with a tokenizer (so final/heldout.jsonl is written), and the
    held-out file's whole text."""
    data = synthetic_data()
    data.tokenizer_path = word_tokenizer(tmp_path / "tokenizer.json")
    ckpt.export_heldout(tmp_path / "whole.jsonl", data.val, data.tokenizer_path, 0)
    return data, (tmp_path / "whole.jsonl").read_text()


def test_a_first_signal_in_the_export_lets_the_run_finish(tmp_path, capsys):
    """Before: the old handlers were back for the export: a Ctrl-C there interrupted it
    (a Ctrl-C in the last step said "stopping after this step", and the next one did)."""
    data, whole = _exporting_data(tmp_path)
    data.val = {**data.val, "beta": SignalOnRead(data.val["beta"])}  # a SIGINT mid-export
    config = three_stage_config(tmp_path / "out", steps=4, stages=[StageConfig("base", seq_len=24)])
    handlers = {s: signal.getsignal(s) for s in stop_module.STOP_SIGNALS}
    Trainer(config, data).train(progress=False)  # not KeyboardInterrupt
    err = capsys.readouterr().err
    assert "stopping after this step" not in err
    assert "SIGINT: the run is finishing (its last step, checkpoint and export)" in err
    assert (tmp_path / "out" / "final" / "heldout.jsonl").read_text() == whole
    assert (tmp_path / "out" / "summary.json").is_file()
    assert {s: signal.getsignal(s) for s in stop_module.STOP_SIGNALS} == handlers


def test_a_second_ctrl_c_in_the_export_leaves_no_partial_file_and_the_rerun_exports(
        tmp_path, monkeypatch, capsys):
    """Before: the second Ctrl-C left a partial final/heldout.jsonl, and the run started
    again saw final/model.pt and exported nothing: `dsv3 eval` scored part of the
    held-out set."""
    data, whole = _exporting_data(tmp_path)
    monkeypatch.setattr(stop_module, "REPEAT_WINDOW_S", 0.0)
    held_out = data.val
    data.val = {**held_out, "beta": SignalOnRead(held_out["beta"])}  # the second Ctrl-C
    config = three_stage_config(tmp_path / "out", steps=4, stages=[StageConfig("base", seq_len=24)])
    with pytest.raises(KeyboardInterrupt):
        signal_at(Trainer(config, data), 3, signal.SIGINT).train(progress=False)
    err = capsys.readouterr().err  # the first, in the last step: the run finishes
    assert "stopping after this step" not in err
    assert "SIGINT: the run is finishing (its last step, checkpoint and export)" in err
    final = tmp_path / "out" / "final"
    assert not (final / "heldout.jsonl").exists()  # alpha's lines were written: not here
    data.val = held_out
    again = Trainer(config, data)
    again.train(progress=False)  # the same command again: trains nothing, exports
    assert again.step == 4 and (final / "heldout.jsonl").read_text() == whole
    assert (tmp_path / "out" / "summary.json").is_file()


def test_an_ignored_signal_stays_ignored(tmp_path):
    """`dsv3 train &` in a script: the shell starts it with SIGINT ignored. Before, the
    trainer's handler replaced SIG_IGN and a SIGINT stopped the run."""
    config = three_stage_config(tmp_path, steps=4, stages=[StageConfig("base", seq_len=24)])
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        trainer = signal_at(Trainer(config, synthetic_data()), 1, signal.SIGINT)
        trainer.train(progress=False)  # not TrainingStopped
        assert trainer.step == 4 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_training_stopped_pickles_and_copies(tmp_path):
    """Before: TypeError (__init__() missing 3 required positional arguments), e.g. when
    multiprocessing or a test runner sends it to another process."""
    stopped = TrainingStopped(10, 20, tmp_path, "SIGTERM")
    for twin in (pickle.loads(pickle.dumps(stopped)), copy.copy(stopped), copy.deepcopy(stopped)):
        assert type(twin) is TrainingStopped and str(twin) == str(stopped)
        assert (twin.step, twin.steps, twin.out_dir, twin.signal_name, twin.signum) == \
            (10, 20, tmp_path, "SIGTERM", signal.SIGTERM)


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


def test_sigterm_in_dsv3_train_exits_143(tmp_path, capsys, monkeypatch):
    """128 + the signal's number, as a shell reports a command a signal ended (before:
    130, Ctrl-C's, for SIGTERM too)."""
    command = command_run(tmp_path)

    def stopped(self, resume=True, progress=True):
        raise TrainingStopped(3, 20, self.out_dir, "SIGTERM")

    monkeypatch.setattr(Trainer, "train", stopped)
    assert main(command) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "dsv3 train: stopped by SIGTERM at step 3 of 20; checkpoint saved in ")


def test_help_and_the_demo_config_name_save_every(capsys):
    from dsv3.train.config import load_config
    assert load_config("demo").save_every == 100
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "save_every" in text and "Ctrl-C" in text and "status 130" in text
    assert "143 on SIGTERM" in text
    assert "--shutdown-timeout" in text and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in text
