"""dsv3.train's checkpoints around a stop: a run that crashed after its last
checkpoint logs each step once and its summary covers the whole run; a finished
run started again keeps its report; starting over (--no-resume) drops the old
run's checkpoint at once; the checkpoint keeps one rank file per rank, of its own
step, and refuses another process count; a checkpoint from before rank files still
resumes. (DDP resumes: tests/test_train_ddp.py.)"""
import json

import pytest
import torch

from dsv3.train import checkpoint as ckpt
from dsv3.train.config import OptimConfig, StageConfig
from dsv3.train.trainer import Trainer
from train_support import synthetic_data, three_stage_config

ONE_STAGE = [StageConfig("base", "lm", 1.0, seq_len=24)]


def crash_at(trainer, step):
    """``trainer.train()`` raises before optimizer step ``step`` (a lost node)."""
    real = trainer.train_step

    def train_step(measure=False):
        if trainer.step == step:
            raise RuntimeError(f"crashed at step {step}")
        return real(measure=measure)

    trainer.train_step = train_step
    return trainer


def logged_steps(out_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").open()]


def test_a_crash_after_the_checkpoint_logs_each_step_once(tmp_path):
    """Checkpoint at step 4, crash at 7: steps 5-7 train again, and their records
    replace those of the crashed run instead of following them."""
    config = three_stage_config(tmp_path, steps=10, log_every=2, save_every=4, stages=ONE_STAGE)
    data = synthetic_data()
    with pytest.raises(RuntimeError, match="crashed at step 7"):
        crash_at(Trainer(config, data), 7).train(progress=False)
    assert logged_steps(tmp_path) == [2, 4, 6]
    history = Trainer(config, data).train(progress=False)
    assert logged_steps(tmp_path) == [2, 4, 6, 8, 10]
    assert [r["step"] for r in history] == [2, 4, 6, 8, 10]  # the run's, not the resumed part's
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    summary = json.loads((tmp_path / "summary.json").read_text())
    first_last = f"{records[0]['loss']:.4f} / {records[-1]['loss']:.4f}"
    assert summary["first / last logged LM loss"] == first_last
    # The same command again: nothing left to train, and the report stands.
    report = (tmp_path / "report.html").read_text()
    Trainer(config, data).train(progress=False)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "report.html").read_text() == report
    assert logged_steps(tmp_path) == [2, 4, 6, 8, 10]


def test_starting_over_drops_the_old_runs_checkpoint(tmp_path):
    """--no-resume, stopped before its first save: the next plain run must not resume
    the old, finished run (and export the old model as its own)."""
    data = synthetic_data()
    old = Trainer(three_stage_config(tmp_path, steps=10, stages=ONE_STAGE), data)
    old.train(progress=False)
    config = three_stage_config(tmp_path, steps=10, stages=ONE_STAGE,
                                optim=OptimConfig(lr=1e-3, warmup_steps=2))
    with pytest.raises(RuntimeError, match="crashed at step 6"):
        crash_at(Trainer(config, data), 6).train(resume=False, progress=False)
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "final").exists()
    new = Trainer(config, data)
    assert [r["step"] for r in new.train(progress=False)] == [5, 10]  # trained from step 0
    exported = torch.load(tmp_path / "final" / "model.pt")
    assert torch.equal(exported["head.weight"], new.model.head.weight)
    assert not torch.equal(exported["head.weight"], old.model.head.weight)


def test_the_checkpoint_keeps_its_own_steps_rank_file_and_its_process_count(tmp_path):
    config = three_stage_config(tmp_path, steps=10, save_every=4, stages=ONE_STAGE)
    Trainer(config, synthetic_data()).train(progress=False)
    # saved at steps 4, 8 and 10: the older rank files go once state.pt is past them
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == \
        ["rank0-step10.pt", "state.pt"]
    with pytest.raises(ValueError, match=r"written by 1 process\(es\), this run has 2: .*"
                                         r"--nproc_per_node.*--no-resume"):
        ckpt.check_resume(tmp_path, config.to_dict(), world=2)
    with pytest.raises(ValueError, match=r"written by 1 process\(es\), this run has 2"):
        ckpt.load_state(tmp_path, rank=1, world=2)


def test_a_checkpoint_from_before_rank_files_resumes(tmp_path):
    """One state.pt holding everything, as single-process runs saved it before."""
    data = synthetic_data()
    straight = Trainer(three_stage_config(tmp_path / "a", steps=6, stages=ONE_STAGE), data)
    straight.train(progress=False)
    first = Trainer(three_stage_config(tmp_path / "b", steps=6, stages=ONE_STAGE), data)
    for _ in range(3):
        first.train_step()
    state = first.state_dict()
    del state["world"]
    path = ckpt.checkpoint_path(tmp_path / "b")
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    ckpt.check_resume(tmp_path / "b", first.config.to_dict())  # no conflict
    resumed = Trainer(three_stage_config(tmp_path / "b", steps=6, stages=ONE_STAGE), data)
    resumed.train(progress=False)
    for (name, a), b in zip(straight.model.state_dict().items(),
                            resumed.model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resuming an old checkpoint"


def test_starting_over_removes_only_the_files_dsv3_wrote(tmp_path):
    """out_dir "." in a project with an eval/ of its own: --no-resume clears what dsv3
    wrote in checkpoint/, final/, eval/, tb/ and out_dir itself, and nothing else."""
    for name in ("checkpoint/state.pt", "checkpoint/rank0-step4.pt", "final/model.pt",
                 "final/config.json", "eval/eval.json", "eval/difficulty.json",
                 "eval/my_script.py", "final/notes.txt", "tb/events.out.tfevents.1.host.2.0",
                 "metrics.jsonl", "summary.json", "report.html", "README.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    ckpt.remove_run(tmp_path)
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "tb").exists()
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["my_script.py"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "eval", "final"]


def test_resume_changes_ignore_path_spellings(tmp_path, monkeypatch):
    """Only settings that changed: not out_dir (the checkpoint was found there), nor a
    data_dir spelled relative where it was absolute."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    saved = {"config": {"out_dir": str(tmp_path / "out"), "data_dir": str(tmp_path / "data"),
                        "optim": {"lr": 0.003}}}
    now = {"out_dir": "out", "data_dir": "data", "optim": {"lr": 0.001}}
    assert ckpt.resume_changes(saved, now) == ["optim.lr: 0.003 -> 0.001"]
    now["data_dir"] = "elsewhere"
    assert ckpt.resume_changes(saved, now)[0].startswith("data_dir: ")
