"""`dsv3 data prepare` writes a staging directory and moves it in only when the run
succeeds: a run that fails, early or late, leaves the previous run's output as it was,
and a first run that fails leaves nothing behind."""
import json

import pytest

from dsv3.cli import main
from dsv3.data.prepare_lock import LOCK, exclusive_run


def _source(path, n=40, broken_at=None):
    rows = [json.dumps({"text": f"Document {i} tells of the harbour, the ships and their "
                                f"cargo of wool and grain. " * 3, "domain": "web"})
            for i in range(n)]
    if broken_at is not None:
        rows.insert(broken_at, "{broken")
    path.write_text("\n".join(rows) + "\n")
    return path


def _config(tmp_path, paths, extra="[tokenizer]\nvocab_size = 300"):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[[sources]]\nkind = \"jsonl\"\npaths = {json.dumps(paths)}\n"
                   f"[steps]\norder = [\"exact_dedup\"]\n{extra}\n")
    return cfg


def _prepare(cfg, out, *flags):
    return main(["data", "prepare", "--config", str(cfg), "--out", str(out), "--no-progress",
                 *flags])


def _snapshot(out):
    """Every file under ``out`` with its bytes and modification time, but for a staging
    directory kept after a run that kept nothing and the (empty) lock file every run
    takes."""
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*"))
            if p.is_file() and ".partial-" not in str(p) and p.name != LOCK}


def _good_run(tmp_path, capsys):
    """A first run whose dropped/ side file is not empty (every document twice: in two
    files, as one file named twice is read once)."""
    source = _source(tmp_path / "a.jsonl")
    copy = _source(tmp_path / "b.jsonl")
    out = tmp_path / "out"
    assert _prepare(_config(tmp_path, [str(source), str(copy)]), out) == 0
    capsys.readouterr()
    assert len((out / "dropped" / "exact_dedup.jsonl").read_text().splitlines()) == 40
    return source, out, _snapshot(out)


def _no_stage_left(tmp_path):
    assert not list(tmp_path.rglob(".partial-*"))


@pytest.mark.parametrize("extra, message", [
    ("[tokenizer]\nvocab_sise = 300", "tokenizer: unknown option(s) ['vocab_sise']"),
    ("[tokenizer]\nvocab_size = 100", "tokenizer.vocab_size must be >= 257, got 100"),
    ("[review]\nper_stratun = 3", "review: unknown option(s) ['per_stratun']"),
    ("[mixture]\ntotal_tokns = 1000", "mixture: unknown option(s) ['total_tokns']"),
    ("[mixture.weights]\nweb = [0.5, 0.4]", "mixture.weights: shares must sum to 1"),
])
def test_config_typo_on_a_rerun_fails_before_touching_the_output(tmp_path, capsys, extra,
                                                                 message):
    """All but the [review] typo were found once the steps had rewritten kept/ and
    dropped/."""
    source, out, before = _good_run(tmp_path, capsys)
    _source(source, n=10)  # a run that got far enough would write different files
    assert _prepare(_config(tmp_path, [str(source)], extra), out) == 2
    assert message in capsys.readouterr().err
    assert _snapshot(out) == before
    _no_stage_left(tmp_path)


@pytest.mark.parametrize("extra, message", [
    # the reader meets a malformed line after most documents went through the steps
    ("[tokenizer]\nvocab_size = 300", "b.jsonl, line 31: invalid JSON"),
    # only known once the documents are kept: a domain the mixture names has none
    ("[tokenizer]\nvocab_size = 300\n[mixture.weights]\nweb = 0.5\nnews = 0.5",
     "mixture.weights: domains ['news'] have no kept documents"),
])
def test_a_rerun_that_fails_late_leaves_the_previous_output_as_it_was(tmp_path, capsys, extra,
                                                                      message):
    _, out, before = _good_run(tmp_path, capsys)
    other = _source(tmp_path / "b.jsonl", n=35, broken_at=30 if "line 31" in message else None)
    assert _prepare(_config(tmp_path, [str(other)], extra), out) == 2
    assert message in capsys.readouterr().err
    assert _snapshot(out) == before
    _no_stage_left(tmp_path)


def test_missing_source_on_a_rerun_is_named_before_any_output_is_opened(tmp_path, capsys,
                                                                         monkeypatch):
    """A mistyped second path used to be found after dropped/ had been reopened (emptied)
    and kept/ rewritten; the error named neither the source nor where it looked."""
    _, out, before = _good_run(tmp_path, capsys)
    monkeypatch.chdir(tmp_path)
    assert _prepare(_config(tmp_path, ["a.jsonl", "a_typo.jsonl"]), out) == 2
    err = capsys.readouterr().err
    assert (f"dsv3 data prepare: error: sources[0].paths: nothing matches 'a_typo.jsonl' "
            f"(looked for '{tmp_path / 'a_typo.jsonl'}': a relative path is taken from the "
            f"working directory)") in err, err
    assert _snapshot(out) == before
    _no_stage_left(tmp_path)


def test_a_failed_first_run_leaves_no_directory_behind(tmp_path, capsys):
    source = _source(tmp_path / "a.jsonl")
    extra = "[tokenizer]\nvocab_size = 300\n[mixture.weights]\nnews = 1.0"
    assert _prepare(_config(tmp_path, [str(source)], extra), tmp_path / "new" / "deep" / "out") == 2
    assert "domains ['news'] have no kept documents" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "c.toml"]


def test_when_nothing_is_kept_the_stage_stays_for_a_look_and_the_output_does_not_change(
        tmp_path, capsys):
    _, out, before = _good_run(tmp_path, capsys)
    cfg = _config(tmp_path, [str(tmp_path / "a.jsonl")])
    cfg.write_text(cfg.read_text().replace('order = ["exact_dedup"]', 'order = ["heuristics"]\n'
                                           '[steps.heuristics]\nmin_words = 100000'))
    assert _prepare(cfg, out) == 2
    err = capsys.readouterr().err
    assert "no documents were kept: this run's stats.json and dropped/ files are in" in err
    stage = next(out.glob(".partial-*"))
    assert str(stage) in err
    assert json.loads((stage / "stats.json").read_text())["steps"]["heuristics"]["dropped"] == 40
    assert len((stage / "dropped" / "heuristics.jsonl").read_text().splitlines()) == 40
    assert _snapshot(out) == before


def test_an_output_that_would_replace_a_source_is_refused(tmp_path, capsys):
    """The source sits where the run writes its domain's kept file: it used to be
    truncated while it was being read."""
    out = tmp_path / "out"
    (out / "kept").mkdir(parents=True)
    source = _source(out / "kept" / "web.jsonl")
    text = source.read_text()
    assert _prepare(_config(tmp_path, [str(source)]), out) == 2
    err = capsys.readouterr().err
    assert f"sources[0]: {str(source)!r} is a source of this run and also one of its " \
           f"outputs" in err, err
    assert source.read_text() == text
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [LOCK, "kept",
                                                                       "kept/web.jsonl"]
    _no_stage_left(tmp_path)


def test_a_second_run_into_a_directory_being_written_stops_before_touching_it(tmp_path,
                                                                              capsys):
    """Two runs moving their outputs into one directory at once would mix them."""
    source, out, before = _good_run(tmp_path, capsys)
    with exclusive_run(str(out)):  # the first run, still writing (flock: per open file)
        assert _prepare(_config(tmp_path, [str(source)]), out) == 2
    err = capsys.readouterr().err
    assert (f"output.dir: {str(out)!r} is being written by another `dsv3 data prepare`"
            in err), err
    assert _snapshot(out) == before
    _no_stage_left(tmp_path)
    # once the first run is done the directory is free again
    assert _prepare(_config(tmp_path, [str(source)]), out) == 0
    capsys.readouterr()
    assert not (out / "dropped" / "exact_dedup.jsonl").read_text()


def test_the_stage_of_a_killed_run_is_removed_by_the_next_one(tmp_path, capsys):
    """A run killed mid-way (SIGKILL, a power cut: no `finally` runs) left its stage, a
    partial second copy of the outputs, for good."""
    source, out, before = _good_run(tmp_path, capsys)
    killed = out / ".partial-killed"
    (killed / "kept").mkdir(parents=True)
    (killed / "kept" / "web.jsonl").write_text("half a run's documents\n")
    looked_at = out / ".partial-nothing-kept"  # a run that kept nothing left it to read
    looked_at.mkdir()
    (looked_at / "stats.json").write_text("{}")
    assert _prepare(_config(tmp_path, [str(source), str(tmp_path / "b.jsonl")]), out) == 0
    err = capsys.readouterr().err
    assert (f"removed {str(killed)!r}, the staging directory of a run into {str(out)!r} "
            f"that was killed before it finished") in err, err
    assert not killed.exists()
    assert (looked_at / "stats.json").read_text() == "{}"
    assert sorted(p.name for p in out.glob(".partial-*")) == [looked_at.name]
    after = _snapshot(out)
    assert after.keys() == before.keys()
    assert after["tokenizer.json"][0] == before["tokenizer.json"][0]
