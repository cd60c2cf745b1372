"""``dsv3 report`` and the files it reads. summary.json is the trainer's alone: the
report of a run without one shows the checkpoint's step on the page but writes no
stand-in (a later report would show it stale, and ``dsv3 train`` would take the run
for reported and never write the real one). A damaged metrics.jsonl or summary.json
is one error line naming the file (and line), but for a last line cut short by a
crash mid-write, which is left out with a warning, as the trainer's own reader does."""
import json

import pytest
import torch

from dsv3.cli import main
from dsv3.train import checkpoint as ckpt
from dsv3.train.report import reported

RECORDS = [{"step": 1, "loss": 4.0, "lr": 1e-3}, {"step": 2, "loss": 3.5, "lr": 1e-3}]


@pytest.fixture
def run(tmp_path):
    """A run as far as the report reads one: two metrics records, a one-process
    checkpoint at step 3 (state.pt and rank 0's file), no summary.json."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    _checkpoint_at(out, 3)
    return out


def _checkpoint_at(run, step):
    path = ckpt.checkpoint_path(run)
    path.parent.mkdir(exist_ok=True)
    torch.save({"step": step, "world": 1, "loader_stage": 0}, path)
    own = {key: None for key in ckpt.RANK_KEYS}
    own["load_counts"] = [torch.tensor([1.0, 3.0])]
    torch.save(own, ckpt.rank_path(run, 0, step))


def _report(run, capsys):
    """(exit status, stderr) of `dsv3 report --run RUN`."""
    status = main(["report", "--run", str(run)])
    return status, capsys.readouterr().err


def test_the_report_shows_the_checkpoints_step_but_writes_no_summary(run, capsys):
    assert _report(run, capsys) == (0, "")
    assert "<th>steps</th><td>3</td>" in (run / "report.html").read_text()
    assert not (run / "summary.json").exists() and not reported(run)
    # Resumed and stopped again later: the next report shows the new step, not a stale one.
    _checkpoint_at(run, 5)
    assert _report(run, capsys) == (0, "")
    assert "<th>steps</th><td>5</td>" in (run / "report.html").read_text()


def test_train_still_repairs_a_run_reported_before_its_summary(tmp_path, capsys):
    """A finished run killed before its summary and report were written: `dsv3 report`
    run on it first must leave the trainer's repair to do (its summary, not a stand-in)."""
    from train_support import command_run
    command = command_run(tmp_path)
    out = tmp_path / "out"
    assert main(command) == 0
    (out / "summary.json").unlink()
    (out / "report.html").unlink()
    assert main(["report", "--run", str(out)]) == 0
    assert not (out / "summary.json").exists()
    assert main(command) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 20 and "parameters" in summary


def test_a_last_line_cut_short_is_left_out_with_a_warning(run, capsys):
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text + '{"step": 3, "lo')  # killed mid-write
    status, err = _report(run, capsys)
    assert status == 0
    assert err.startswith(f"dsv3 report: warning: {run / 'metrics.jsonl'}:3: ")
    assert "cut short" in err and err.count("\n") == 1
    assert (run / "report.html").is_file()


@pytest.mark.parametrize("content, message", [
    # a bad line before the last is no crash mid-write: refused, by file and line
    ('{"step": 1, "loss": 4.0}\n{"step": 2, "lo\n{"step": 3, "loss": 3.0}\n',
     "metrics.jsonl:2 is not JSON"),
    ('{"step": 1, "loss": 4.0}\n{"step": 2, "note": "\xff"}\n'.encode("latin-1"),
     "metrics.jsonl:2: not valid UTF-8 (byte 22 of the line)"),
    ('{"step": 1, "loss": 4.0}\n{"loss": 1.0}\n', "metrics.jsonl:2 lacks a whole-number 'step'"),
    ('{"step": "1", "loss": 4.0}\n', "metrics.jsonl:1 lacks a whole-number 'step'"),
    ('["loss", 1]\n{"step": 1}\n', "metrics.jsonl:1 must be a JSON object, got list"),
])
def test_a_damaged_metrics_file_is_named_with_its_line(run, capsys, content, message):
    if isinstance(content, str):
        (run / "metrics.jsonl").write_text(content)
    else:
        (run / "metrics.jsonl").write_bytes(content)
    status, err = _report(run, capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith(f"dsv3 report: error: {run / 'metrics.jsonl'}"), err
    assert message in err
    assert not (run / "report.html").exists()


@pytest.mark.parametrize("content, message", [
    (b"[1, 2]", "summary.json must hold a JSON object, got list"),
    (b"", "summary.json is empty"),
    (b'{"steps": 20, "first_lo', "summary.json is not JSON"),
    (b'{"a": "\xff"}', "summary.json is not valid UTF-8"),
])
def test_a_damaged_summary_is_named(run, capsys, content, message):
    (run / "summary.json").write_bytes(content)
    status, err = _report(run, capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith(f"dsv3 report: error: {run / 'summary.json'}"), err
    assert message in err
    assert (run / "summary.json").read_bytes() == content  # left as it was
    assert not (run / "report.html").exists()


def test_records_without_a_plotted_metric_make_no_empty_figure(run, capsys):
    """Only keys no panel plots: there are no curves to draw (matplotlib refused a
    figure of 0 rows)."""
    (run / "metrics.jsonl").write_text('{"step": 1, "perplexity": 3.0}\n')
    assert _report(run, capsys) == (0, "")
    assert "<h2>Curves</h2>" not in (run / "report.html").read_text()
