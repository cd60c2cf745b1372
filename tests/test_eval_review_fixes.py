"""dsv3 eval, fixes from a review: a missing sacrebleu is named before the model loads
(not after the other tasks ran); --tasks that names no task is refused; a corpus
domain named like a result count (truncated_prompts, ...) is reported as a domain;
level-1 cloze falls back to same-domain distractors when the other domain's documents
are all too short; the documents are read only when a task scores them; BLEU is
sacrebleu's exponentially smoothed one, as the generation docstring says."""
import json
import math
import sys

import pytest

from dsv3.eval.cli import main as eval_main
from dsv3.eval.cloze import cloze_items
from dsv3.eval.generation import corpus_scores
from dsv3.eval.report import html_fragment, markdown_table, result_warnings
from dsv3.eval.runner import parse_tasks, prepare_evaluation
from test_eval_support import save_checkpoint, tiny_model, train_tokenizer, write_jsonl

MC_ROWS = [{"question": "What is 1 plus 2?", "choices": ["3", "4"], "answer": 0},
           {"question": "What is 2 plus 2?", "choices": ["4", "5"], "answer": 0}]


@pytest.fixture
def checkpoint(tmp_path):
    save_checkpoint(tmp_path / "ckpt", tiny_model(), train_tokenizer())
    return tmp_path / "ckpt"


def never_load(*args, **kwargs):
    """A load_checkpoint that stops the run as a Ctrl-C would (exit 130): a test whose
    run reaches it failed to report its input error before the model."""
    raise KeyboardInterrupt


# -- 1: sacrebleu missing ----------------------------------------------------------

def test_a_missing_sacrebleu_is_named_before_the_model_loads(checkpoint, tmp_path, capsys,
                                                              monkeypatch):
    """Before: ppl and cloze ran, the sources were decoded, and only then did the
    import fail (exit 2, no eval.json, and without the install hint)."""
    import dsv3.eval.loading
    from dsv3.cli import main as dsv3_main
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # makes `import sacrebleu` fail
    monkeypatch.setattr(dsv3.eval.loading, "load_checkpoint", never_load)
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"source": "a dog", "reference": "ran"}])
    with pytest.raises(ImportError, match=r"pip install 'dsv3\[eval\]'"):
        prepare_evaluation([f"gen:{gen}"])
    argv = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"),
            "--tasks", f"ppl,gen:{gen}", "--no-progress"]
    want = ("error: gen: BLEU and chrF need sacrebleu, an optional package: "
            "pip install 'dsv3[eval]'\n")
    assert eval_main(argv) == 2
    assert capsys.readouterr().err == "dsv3 eval: " + want
    # `dsv3 eval` adds no second install hint to the message's own.
    assert dsv3_main(["eval", *argv]) == 2
    assert capsys.readouterr().err == "dsv3 eval: " + want


# -- 2: --tasks naming no task -----------------------------------------------------

@pytest.mark.parametrize("spec", [",", " , ", ",,"])
def test_tasks_that_name_no_task_are_refused(tmp_path, capsys, spec):
    """Before: evaluated nothing, exited 0 and overwrote eval.json and eval.md."""
    with pytest.raises(ValueError, match="tasks must name at least one task"):
        parse_tasks(spec)
    out = tmp_path / "out"
    assert eval_main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(out),
                      "--tasks", spec, "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"dsv3 eval: error: tasks must name at least one "
                                       f"task, got {spec!r}\n")
    assert not out.exists()


# -- 3: a domain named like a count ------------------------------------------------

COUNT_NAMES = ("truncated_prompts", "capped_requests", "stopped_at_context")


def test_ppl_domains_named_like_counts_are_domains():
    """ppl's results are keyed by domain: result_warnings read a domain's summary as
    a count, then failed on "tasks['ppl'] lacks the field 'n'" (also in `dsv3 report`,
    which renders eval.json with html_fragment)."""
    summary = {"perplexity": 9.5, "nll_per_token": 2.25, "bits_per_byte": 1.5,
               "tokens": 40, "bytes": 120, "documents": 1, "skipped": 0}
    results = {"tasks": {"ppl": {**{name: summary for name in COUNT_NAMES},
                                 "all": summary}}, "difficulty": {}}
    assert result_warnings(results) == []
    table, fragment = markdown_table(results), html_fragment(results)
    for name in COUNT_NAMES:
        assert f"perplexity [{name}]" in table and f"perplexity [{name}]" in fragment
    assert "Warnings" not in table


def test_dsv3_eval_scores_a_domain_named_like_a_count(checkpoint, tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [
        {"domain": name, "text": "the cat sat on the mat and the dog ran"}
        for name in COUNT_NAMES])
    out = tmp_path / "out"
    assert eval_main(["--checkpoint", str(checkpoint), "--out", str(out), "--tasks", "ppl",
                      "--corpus", corpus, "--no-progress"]) == 0
    assert set(json.loads((out / "eval.json").read_text())["tasks"]["ppl"]) == {
        *COUNT_NAMES, "all"}
    assert "perplexity [truncated_prompts]" in (out / "eval.md").read_text()


# -- 4: level-1 cloze with a short other-domain document ---------------------------

def test_level_one_cloze_passes_over_short_other_domain_documents():
    """Before: the one other-domain document, too short for a distractor, kept the
    same-domain fallback off, so no item could be cut at all."""
    long_a = " ".join(f"alpha{i}" for i in range(100))
    long_a2 = " ".join(f"beta{i}" for i in range(100))
    docs = [("A", long_a), ("A", long_a2), ("B", "too short")]
    items = cloze_items(docs, 1, 5)
    assert len(items) == 5
    # The short document draws nothing: the items are those of the long ones alone.
    assert items == cloze_items(docs[:2], 1, 5)


def test_level_one_cloze_still_prefers_another_domain():
    """A long enough other-domain document is still where level 1's distractors come
    from (the fallback is for when there is none)."""
    docs = [("A", " ".join(f"alpha{i}" for i in range(100))),
            ("A", " ".join(f"beta{i}" for i in range(100))),
            ("B", " ".join(f"gamma{i}" for i in range(20)))]
    items = [it for it in cloze_items(docs, 1, 10) if it.question.startswith("alpha")]
    assert items
    for item in items:
        distractor = item.choices[1 - item.answer]
        assert distractor.startswith("gamma")


# -- 5: documents read only when a task scores them ---------------------------------

def test_a_damaged_heldout_file_does_not_stop_tasks_without_documents(checkpoint, tmp_path,
                                                                     capsys):
    """Before: CHECKPOINT/heldout.jsonl was read (and had to parse) for any task list."""
    (checkpoint / "heldout.jsonl").write_text("not json\n")
    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    out = tmp_path / "out"
    assert eval_main(["--checkpoint", str(checkpoint), "--out", str(out),
                      "--tasks", f"mc:{mc}", "--no-progress"]) == 0
    results = json.loads((out / "eval.json").read_text())
    assert set(results["tasks"]) == {f"mc:{mc}"} and "corpus" not in results
    err = capsys.readouterr().err  # (the tiny model's context cuts the mc prompts)
    assert "heldout.jsonl" not in err and "embedded" not in err


def test_an_unused_corpus_is_not_read_but_named(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    base = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--corpus",
            str(bad), "--no-progress"]
    assert eval_main(base + ["--tasks", f"mc:{mc}"]) == 0
    assert (f"dsv3 eval: warning: --corpus {bad} is not used: none of the tasks (mc:{mc}) "
            f"reads documents\n") in capsys.readouterr().err
    # Used, it must still parse.
    assert eval_main(base + ["--tasks", "ppl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv3 eval: error: ") and str(bad) in err and "not used" not in err


# -- 7: BLEU is smoothed -----------------------------------------------------------

def test_bleu_is_sacrebleus_exponentially_smoothed_one():
    """The generation docstring said smoothing was off; with it off, a hypothesis
    without a matching 4-gram would score 0."""
    import sacrebleu
    hyps, refs = ["the cat sat by the dog"], ["the cat sat on the dog"]
    bleu = corpus_scores(hyps, refs)["bleu"]
    assert bleu > 0 and sacrebleu.corpus_bleu(hyps, [refs], smooth_method="none").score == 0
    assert math.isclose(bleu, sacrebleu.corpus_bleu(hyps, [refs], smooth_method="exp").score)
    import dsv3.eval.generation as generation
    assert "smoothing off" not in generation.__doc__
