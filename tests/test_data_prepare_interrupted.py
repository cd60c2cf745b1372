"""`dsv3 data prepare` interrupted while it moves its outputs in (Ctrl-C, a kill): the
directory held a new tokenizer.json next to the old tokens/ (or new tokens for some
domains, old for others), the trainer read it without a word, and the Ctrl-C deleted
the stage with the files not yet moved. Now the move rolls forward: the trainer
refuses the directory, nothing is lost, and the next prepare finishes the move.

The interruption is a KeyboardInterrupt raised in place of one step of the move (a
rename or a removal, the journal's own included), at every step in turn."""
import json
import os
import shutil

import pytest

from dsv3.cli import main
from dsv3.data.loader import PackedLoader
from dsv3.data.movein import JOURNAL, finish_interrupted
from dsv3.data.prepare_lock import LOCK
from dsv3.train.data import TrainData

# Run A writes two domains; run B, the one interrupted, only the first, so its move
# also removes A's files of the second (stale). Both are small and deterministic.
RUN_A = ["reference", "docstrings"]
RUN_B = ["reference"]
# B's move into A's output: the journal's rename, 10 files, 3 stale removals,
# stats.json, the journal's removal (checked by test_the_steps_are_counted_right)
MOVE_STEPS = 16


def _config(tmp_path, domains, extra=""):
    cfg = tmp_path / f"{'-'.join(domains)}{len(extra)}.toml"
    cfg.write_text(f"[[sources]]\nkind = \"embedded\"\ndomains = {json.dumps(domains)}\n"
                   f"max_docs_per_domain = 4\n[steps]\norder = [\"exact_dedup\"]\n"
                   f"[tokenizer]\nvocab_size = 300\n{extra}")
    return cfg


def _prepare(cfg, out):
    return main(["data", "prepare", "--config", str(cfg), "--out", str(out), "--no-progress"])


def _content(path):
    """A file's bytes; stats.json without its timings, which differ between runs."""
    if path.name == "stats.json":
        stats = json.loads(path.read_text())
        stats.pop("seconds")
        return stats
    return path.read_bytes()


def _outputs(out):
    """Every file under ``out`` but the stage and the journal."""
    return {str(p.relative_to(out)): _content(p) for p in sorted(out.rglob("*"))
            if p.is_file() and ".partial-" not in str(p) and p.name != JOURNAL}


@pytest.fixture(scope="module")
def uninterrupted_b(tmp_path_factory):
    """What run B writes into run A's output when nothing stops it."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    out = tmp / "out"
    assert _prepare(_config(tmp, RUN_A), out) == 0
    assert _prepare(_config(tmp, RUN_B), out) == 0
    return _outputs(out)


class Interrupt:
    """Raises KeyboardInterrupt in place of the ``at``-th (0-based) rename or removal
    from now on, or of the rename onto a path ending in ``before``, once; counts those
    it saw. A prepare renames and removes nothing before its move
    (test_the_steps_are_counted_right), so these are the move's steps."""

    def __init__(self, monkeypatch, at=None, before=None):
        self.at, self.before, self.steps, self.fired = at, before, 0, False
        for name in ("replace", "remove"):
            monkeypatch.setattr(os, name, self._step(name, getattr(os, name)))

    def _step(self, name, real):
        def step(*args, **kwargs):
            self.steps += 1
            if not self.fired and (self.steps == self.at + 1 if self.at is not None else
                                   name == "replace" and str(args[1]).endswith(self.before)):
                self.fired = True
                raise KeyboardInterrupt
            return real(*args, **kwargs)
        return step


def _interrupted_b(tmp_path, monkeypatch, **where):
    """Run A, then run B stopped where ``where`` (Interrupt's) says; returns (out, A's
    outputs)."""
    out = tmp_path / "out"
    assert _prepare(_config(tmp_path, RUN_A), out) == 0
    before = _outputs(out)
    with monkeypatch.context() as patch:
        interrupt = Interrupt(patch, **where)
        # the command says what is left (its one line is checked below) and exits 130
        assert _prepare(_config(tmp_path, RUN_B), out) == 130
        assert interrupt.fired
    return out, before


def test_the_steps_are_counted_right(tmp_path, monkeypatch, uninterrupted_b):
    """The parametrized tests stop the move at each of MOVE_STEPS steps: all of them."""
    out = tmp_path / "out"
    assert _prepare(_config(tmp_path, RUN_A), out) == 0
    with monkeypatch.context() as patch:
        interrupt = Interrupt(patch, at=-1)  # never
        assert _prepare(_config(tmp_path, RUN_B), out) == 0
    assert interrupt.steps == MOVE_STEPS
    assert _outputs(out) == uninterrupted_b


@pytest.mark.parametrize("at", range(MOVE_STEPS))
def test_an_interrupted_move_loses_nothing_and_the_next_prepare_finishes_it(
        tmp_path, monkeypatch, capsys, uninterrupted_b, at):
    out, before = _interrupted_b(tmp_path, monkeypatch, at=at)
    err = capsys.readouterr().err
    # one line, no traceback, saying whether the next run has a move to finish
    left = (f"{str(out)!r} is as it was before this run" if at == 0 else
            f"it was moving its outputs into {str(out)!r}: the next `dsv3 data prepare` "
            f"into it finishes that move first")
    assert err == f"dsv3 data prepare: interrupted; {left}\n", err
    if at == 0:
        # stopped writing the journal: the move was not decided, nothing changed
        assert _outputs(out) == before
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [LOCK]
    else:
        # decided: every file of B is either still in the stage or moved in, and the
        # trainer refuses the directory
        stages = list(out.glob(".partial-*"))
        assert len(stages) == 1, "the stage, with the files not yet moved, is gone"
        for relative, content in uninterrupted_b.items():
            staged = stages[0] / relative
            assert _content(staged if staged.exists() else out / relative) == content, relative
        with pytest.raises(ValueError, match="is mid-update"):
            TrainData.load(out)

    assert _prepare(_config(tmp_path, RUN_B), out) == 0
    err = capsys.readouterr().err
    assert ("was mid-update from an interrupted run: finished moving that run's outputs "
            "in" in err) == (at > 0), err
    assert _outputs(out) == uninterrupted_b
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [LOCK]
    TrainData.load(out)


@pytest.mark.parametrize("at", [1, 7, 12, 14, 15])
def test_finishing_alone_completes_the_interrupted_run(tmp_path, monkeypatch, capsys,
                                                       uninterrupted_b, at):
    """The next run fails late (after the finish, before its own move): what is left
    is run B, whole, and no longer mid-update."""
    out, _ = _interrupted_b(tmp_path, monkeypatch, at=at)
    failing = _config(tmp_path, RUN_B, "[mixture.weights]\nnews = 1.0\n")
    assert _prepare(failing, out) == 2
    err = capsys.readouterr().err
    assert "finished moving that run's outputs in" in err
    assert "mixture.weights: domains ['news'] have no kept documents" in err
    assert _outputs(out) == uninterrupted_b
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [LOCK]


def test_an_interrupted_finish_is_finished_by_the_next_run(tmp_path, monkeypatch, capsys,
                                                           uninterrupted_b):
    out, _ = _interrupted_b(tmp_path, monkeypatch, at=5)
    with monkeypatch.context() as patch:
        Interrupt(patch, at=2)  # the finish comes first
        assert _prepare(_config(tmp_path, RUN_B), out) == 130
    assert (out / JOURNAL).is_file()
    assert _prepare(_config(tmp_path, RUN_B), out) == 0
    assert "finished moving that run's outputs in" in capsys.readouterr().err
    assert _outputs(out) == uninterrupted_b


def test_the_trainer_refuses_a_directory_mid_update(tmp_path, monkeypatch, capsys,
                                                    uninterrupted_b):
    """Stopped after B's tokenizer.json moved in, before its tokens/: A's token ids
    next to B's vocabulary. The trainer used to load it."""
    out, before = _interrupted_b(tmp_path, monkeypatch, before="tokens/manifest.json")
    assert _outputs(out)["tokenizer.json"] == uninterrupted_b["tokenizer.json"] \
        != before["tokenizer.json"]
    assert _outputs(out)["tokens/manifest.json"] == before["tokens/manifest.json"]
    with pytest.raises(ValueError, match="is mid-update"):
        TrainData.load(out)
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "run"), "--data", str(out),
                 "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        f"dsv3 train: error: data_dir: {str(out)!r} is mid-update: a `dsv3 data prepare` into "
        f"it was interrupted while moving its outputs in ({JOURNAL} is there), so it may hold "
        f"files of two runs; re-run that `dsv3 data prepare` (same config) to finish the "
        f"update\n")


def _snapshot(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("damage, why", [
    ("stage gone", "its staging directory {stage!r}, which held the files not yet moved, "
                   "is gone"),
    ("staged file gone", "['tokens/reference.tokens.npy'] are neither in {stage!r} nor "
                         "moved into {out!r}"),
    ("moved file replaced", "['kept/reference.jsonl'] are neither in {stage!r} nor moved "
                            "into {out!r}"),
])
def test_a_move_that_cannot_be_finished_says_what_to_do(tmp_path, monkeypatch, capsys,
                                                        uninterrupted_b, damage, why):
    out, _ = _interrupted_b(tmp_path, monkeypatch, at=5)  # kept/ moved in, tokens/ not
    stage = next(out.glob(".partial-*"))
    if damage == "stage gone":
        shutil.rmtree(stage)
    elif damage == "staged file gone":
        (stage / "tokens" / "reference.tokens.npy").unlink()
    else:
        (out / "kept" / "reference.jsonl").write_text("{}\n")
    before = _snapshot(out)
    capsys.readouterr()
    assert _prepare(_config(tmp_path, RUN_B), out) == 2
    remove = repr(str(out / JOURNAL)) + ("" if damage == "stage gone" else f" and {str(stage)!r}")
    assert capsys.readouterr().err == (
        f"dsv3 data prepare: error: {str(out)!r} is mid-update from an interrupted `dsv3 data "
        f"prepare`, and the move cannot be finished: "
        f"{why.format(stage=str(stage), out=str(out))}. It holds files of two runs: remove "
        f"{remove} and run `dsv3 data prepare` again to rewrite its outputs, or write the run "
        f"to a fresh directory\n")
    assert _snapshot(out) == before
    (out / JOURNAL).unlink()  # what the message says to do
    shutil.rmtree(stage, ignore_errors=True)
    assert _prepare(_config(tmp_path, RUN_B), out) == 0
    assert _outputs(out) == uninterrupted_b
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [LOCK]


def test_finishing_touches_no_source_of_the_next_run(tmp_path, monkeypatch, uninterrupted_b):
    """Neither a stale output the next run reads (removed otherwise), nor one that a
    file still in the stage would replace (the finish then stops before any change)."""
    out, _ = _interrupted_b(tmp_path, monkeypatch, at=1)  # only the journal is in
    kept = os.path.realpath(out / "kept" / "reference.jsonl")  # still A's, B's is staged
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"sources\[0\]: .* is a source of this run and also "
                                         r"a file the interrupted run would move in"):
        finish_interrupted(str(out), {kept: 0})
    assert _snapshot(out) == before
    stale = out / "kept" / "docstrings.jsonl"  # A's; B removes it
    text = stale.read_bytes()
    assert finish_interrupted(str(out), {os.path.realpath(stale): 0}) is not None
    assert _outputs(out) == {**uninterrupted_b, "kept/docstrings.jsonl": text}
    assert not (out / JOURNAL).exists() and not list(out.glob(".partial-*"))


def test_the_packed_loader_refuses_a_directory_mid_update(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / JOURNAL).write_text("{}")
    with pytest.raises(ValueError, match="directory: .* is mid-update"):
        PackedLoader.from_prepared(str(out), seq_len=8, batch_size=2)
