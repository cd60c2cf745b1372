"""``dsv3 report``: the run's own evaluation is optional, but an --eval that names
a missing or malformed file (a hand-edited or partial one: the task and the field) is
an error naming --eval and the path (exit 2), not a report silently without its
evaluation, nor a traceback. A DDP run's heat map counts every rank's tokens."""
import json

import pytest

from dsv3.cli import main

EVAL = {"tasks": {"ppl": {"all": {"perplexity": 12.5, "bits_per_byte": 1.25, "tokens": 100,
                                  "bytes": 400}}}}


@pytest.fixture
def run(tmp_path):
    """A training run as far as the report needs one: metrics, no checkpoint."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")  # no records: no plots, keeps the test fast
    return out


def _report(run, *extra):
    return main(["report", "--run", str(run), *extra])


def test_the_runs_own_evaluation_is_optional(run, capsys):
    assert _report(run) == 0
    assert "Evaluation" not in (run / "report.html").read_text()
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text(json.dumps(EVAL))
    assert _report(run) == 0
    page = (run / "report.html").read_text()
    assert page.count("<h2>Evaluation</h2>") == 1 and "perplexity [all]" in page


@pytest.mark.parametrize("as_dir", [False, True])
def test_explicit_eval_file_or_directory(run, tmp_path, as_dir):
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "eval.json").write_text(json.dumps(EVAL))
    given = tmp_path / "ev" if as_dir else tmp_path / "ev" / "eval.json"
    assert _report(run, "--eval", str(given)) == 0
    assert "perplexity [all]" in (run / "report.html").read_text()


@pytest.mark.parametrize("given", ["nope.json", "empty_dir"])
def test_missing_explicit_eval_is_an_error(run, tmp_path, capsys, given):
    (tmp_path / "empty_dir").mkdir()
    assert _report(run, "--eval", str(tmp_path / given)) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv3 report: error: --eval:") and given in err and err.count("\n") == 1
    assert not (run / "report.html").exists()


@pytest.mark.parametrize("text, match", [
    ("{not json", "is not JSON"),
    ("[1, 2]", "is not a dsv3 eval.json"),
    # cut short or hand-edited: this one was a KeyError traceback
    ('{"tasks": {"ppl": {"all": {"perplexity": 3.0}}}}',
     "is not a complete dsv3 eval.json: tasks['ppl'] lacks the field 'tokens'"),
    ('{"tasks": {"cloze": {"accuracy": 0.5}}}', "tasks['cloze'] is malformed"),
    ('{"tasks": {"cloze": {}}, "difficulty": {"cloze": {"threshold": 0.5}}}',
     "difficulty['cloze'] lacks the field 'history'"),
    # a task from a newer dsv3 or a typo: its results were left out of the table, silently
    ('{"tasks": {"ppl": {}, "summarize": {"rouge": 0.3}}}',
     "tasks['summarize'] is not a task this dsv3 reports (known: ppl, cloze, toxicity, bias, "
     "mc:NAME, gen:NAME, lm-eval:NAME)"),
])
def test_malformed_eval_names_the_option_and_file(run, tmp_path, capsys, text, match):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    assert _report(run, "--eval", str(bad)) == 2
    err = capsys.readouterr().err
    assert "--eval" in err and "bad.json" in err and match in err and err.count("\n") == 1


def test_rebuilding_the_report_keeps_the_trainers_summary(run, capsys):
    """`make demo` ends with `dsv3 report`, which rebuilds report.html to add the
    evaluation: the trainer's summary (stages, parameters, losses) must survive it."""
    from dsv3.train.report import write_report
    write_report(run, summary={"stages": "base, domain", "parameters": 645_000})
    assert _report(run) == 0
    page = (run / "report.html").read_text()
    assert "<th>stages</th><td>base, domain</td>" in page and "645000" in page


def _ddp_checkpoint(run, ranks_saved):
    """A 2-process run's checkpoint as far as the heat map reads it: state.pt and the
    rank files of ``ranks_saved``, rank r having counted [r + 1, 10 * (r + 1)]."""
    import torch

    from dsv3.train import checkpoint as ckpt
    path = ckpt.checkpoint_path(run)
    path.parent.mkdir()
    torch.save({"step": 3, "world": 2, "loader_stage": 0}, path)
    for rank in ranks_saved:
        own = {key: None for key in ckpt.RANK_KEYS}
        own["load_counts"] = [torch.tensor([rank + 1.0, 10.0 * (rank + 1)])]
        torch.save(own, ckpt.rank_path(run, rank, 3))


@pytest.mark.parametrize("ranks_saved, counted, warned", [
    ([0, 1], [3.0, 30.0], False), ([0], [1.0, 10.0], True)])
def test_the_heat_map_counts_every_ranks_tokens(run, capsys, monkeypatch, ranks_saved,
                                                 counted, warned):
    """A DDP run's ranks each counted their own tokens (their rank files): the rebuilt
    heat map sums them all; with a rank's file gone, rank 0's alone, with a warning."""
    import dsv3.train.report as report_module
    heat = []
    monkeypatch.setattr(report_module, "write_report",
                        lambda run, counts, *rest, **options:
                        heat.append(counts) or run / "report.html")
    _ddp_checkpoint(run, ranks_saved)
    assert _report(run) == 0
    assert [counts.tolist() for counts in heat[0]] == [counted]
    err = capsys.readouterr().err
    assert ("counts rank 0's tokens only: rank 1's state" in err) == warned, err
