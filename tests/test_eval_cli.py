"""dsv3.eval end to end: ``python -m dsv3.eval`` on a tiny checkpoint with every local
task writes eval.json / eval.md / the difficulty state, twice (the history grows);
``register`` plugs into a parent parser; a model that knows a leveled task's answers
climbs a level per evaluation; the HTML fragment; errors reach the user as one line
(`dsv3 eval --device` that this machine lacks: before the checkpoint is loaded); without
--corpus the checkpoint's heldout.jsonl is scored (else the embedded split, with a
warning); cut prompts are reported (scored and generated ones, and context stops in
older results); every option has help; the reports show only the difficulty
histories of the tasks run."""
import argparse
import json

import pytest

from dsv3.eval.cli import register, run
from dsv3.eval.cli import main as eval_main
from dsv3.eval.multiple_choice import build_prompts, read_mc_file
from dsv3.eval.report import html_fragment, markdown_table
from dsv3.eval.runner import EvalOptions, parse_tasks, run_evaluation
from test_eval_support import (OracleModel, codec, save_checkpoint, tiny_model, train_tokenizer,
                               write_jsonl)

CORPUS = [{"domain": "prose",
           "text": "the cat sat on the mat and then the dog ran in the park " * 6},
          {"domain": "prose", "text": "once upon a time a quick brown fox jumped over a dog " * 6},
          {"domain": "code", "text": "def add(a, b): return a + b  # adds two numbers " * 6}]
MC_ROWS = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1)],
            "answer": 0, "level": level} for level, (a, b) in
           [(1, (1, 2)), (1, (2, 2)), (2, (3, 4)), (2, (5, 1)), (3, (6, 7))]]


@pytest.fixture
def setup(tmp_path):
    save_checkpoint(tmp_path / "ckpt", tiny_model(), train_tokenizer())
    files = {"corpus": write_jsonl(tmp_path / "corpus.jsonl", CORPUS),
             "mc": write_jsonl(tmp_path / "arith.jsonl", MC_ROWS),
             "gen": write_jsonl(tmp_path / "gen.jsonl", [{"source": "a dog", "reference": "ran"}]),
             "bias": str(tmp_path / "bias.json"), "lexicon": str(tmp_path / "lexicon.txt")}
    (tmp_path / "bias.json").write_text(json.dumps({"templates": ["The {term} ran in the park"],
                                                    "terms": ["cat", "dog"]}))
    (tmp_path / "lexicon.txt").write_text("zorblax\n")
    return tmp_path, files


def test_module_entry_point_writes_results_and_keeps_history(setup, capsys):
    tmp_path, files = setup
    out = tmp_path / "out"
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--out", str(out), "--corpus", files["corpus"],
            "--tasks", f"ppl,cloze,mc:{files['mc']},gen:{files['gen']},toxicity,bias",
            "--cloze-items", "4", "--max-new-tokens", "3", "--toxicity-lexicon", files["lexicon"],
            "--bias-spec", files["bias"], "--no-progress"]
    assert eval_main(argv) == 0
    assert eval_main(argv) == 0
    results = json.loads((out / "eval.json").read_text())
    assert set(results["tasks"]) == {"ppl", "cloze", f"mc:{files['mc']}", f"gen:{files['gen']}",
                                     "toxicity", "bias"}
    assert set(results["tasks"]["ppl"]) == {"prose", "code", "all"}
    assert results["tasks"]["cloze"]["accuracy"]["n"] == 4
    state = json.loads((out / "difficulty.json").read_text())
    assert [h["evaluation"] for h in state["cloze"]["history"]] == [0, 1]
    assert results["difficulty"][f"mc:{files['mc']}"]["history"][-1]["evaluation"] == 1
    table = (out / "eval.md").read_text()
    for metric in ("perplexity [all]", "accuracy (level", "bleu", "toxic rate", "gap (",
                   "Difficulty history of cloze"):
        assert metric in table
    assert "wrote" in capsys.readouterr().out


def test_register_adds_eval_to_a_parent_parser(setup):
    tmp_path, _ = setup
    parser = argparse.ArgumentParser(prog="dsv3")
    register(parser.add_subparsers(dest="group", required=True))
    args = parser.parse_args(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--out",
                              str(tmp_path / "o"), "--tasks", "ppl", "--corpus",
                              str(tmp_path / "corpus.jsonl"), "--no-progress"])
    assert args.func is run
    assert args.func(args) == 0
    assert (tmp_path / "o" / "eval.json").exists()


def test_a_model_that_knows_the_answers_climbs_one_level_per_evaluation(setup):
    tmp_path, files = setup
    text_codec = codec()
    items, _ = read_mc_file(files["mc"])
    prompts = build_prompts(items)
    eos = text_codec.eos_id
    correct = [[eos] + text_codec.encode(p) + text_codec.encode(" " + it.choices[it.answer])
               for it, p in zip(items, prompts)]
    model = OracleModel(text_codec.vocab_size, correct)
    options = EvalOptions(documents=[], difficulty_state=str(tmp_path / "state.json"),
                          progress=False)
    levels = []
    for _ in range(4):
        result = run_evaluation(model, text_codec, [f"mc:{files['mc']}"], options)
        levels.append(result["tasks"][f"mc:{files['mc']}"]["level"])
    assert levels == [1, 2, 3, 3]
    history = result["difficulty"][f"mc:{files['mc']}"]["history"]
    assert [(h["level"], h["accuracy"], h["promoted"]) for h in history] == [
        (1, 1.0, True), (2, 1.0, True), (3, 1.0, False), (3, 1.0, False)]
    fragment = html_fragment(result)
    assert fragment.startswith('<section class="dsv3-eval">')
    assert fragment.count("<td>yes</td>") == 2 and f"mc:{files['mc']}" in fragment
    assert "| 2 | 3 | 1.000 | no |" in markdown_table(result)


def test_errors_reach_the_user_as_one_line(setup, capsys):
    tmp_path, _ = setup
    base = ["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"), "--no-progress"]
    assert eval_main(base + ["--tasks", "ppl,nonsense"]) == 2
    assert "unknown task 'nonsense'" in capsys.readouterr().err
    assert eval_main(["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    # named by the option, not by the internal function that read it
    assert f"error: --checkpoint: directory {str(tmp_path / 'none')!r} does not exist" in \
        capsys.readouterr().err
    assert eval_main(base + ["--tasks", "ppl", "--corpus", str(tmp_path / "absent.jsonl")]) == 2
    assert "error: --corpus: " in capsys.readouterr().err
    corpus = ["--corpus", str(tmp_path / "corpus.jsonl")]
    assert eval_main(base + ["--tasks", "toxicity"] + corpus) == 2
    assert "--toxicity-lexicon PATH or --toxicity-classifier DIR" in capsys.readouterr().err
    with pytest.raises(ValueError, match="names a task twice"):
        parse_tasks("ppl,ppl")


def test_html_escapes_what_it_shows():
    results = {"tasks": {"bias": {"per_term": {"<b>": -1.0, "x": -2.0}, "gap": 1.0,
                                  "max_term": "<b>", "min_term": "x", "templates": 1}},
               "difficulty": {}}
    fragment = html_fragment(results)
    assert "&lt;b&gt;" in fragment and "<b>" not in fragment


@pytest.mark.parametrize("device", ["tpu", "cuda:7"])
def test_dsv3_eval_names_an_unusable_device_before_loading(tmp_path, capsys, monkeypatch, device):
    import torch

    from dsv3.cli import main as dsv3_main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["eval", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
            "--device", device]
    assert dsv3_main(argv) == 2
    assert capsys.readouterr().err == (f"dsv3 eval: error: --device {device!r} is not available "
                                       f"on this machine; available: cpu\n")



def test_without_corpus_the_checkpoints_heldout_documents_are_scored(setup, capsys):
    """The embedded corpus' split is not the trainer's held-out set: the default is
    CHECKPOINT/heldout.jsonl, which the trainer exports."""
    tmp_path, _ = setup
    heldout = [{"domain": "held-out", "text": "the cat sat on the mat " * 4}]
    write_jsonl(tmp_path / "ckpt" / "heldout.jsonl", heldout)
    out = tmp_path / "out"
    assert eval_main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(out), "--tasks",
                      "ppl", "--no-progress"]) == 0
    results = json.loads((out / "eval.json").read_text())
    assert set(results["tasks"]["ppl"]) == {"held-out", "all"}
    assert results["corpus"] == str(tmp_path / "ckpt" / "heldout.jsonl")
    assert results["moe"] == {"evaluated": "dropless", "trained_capacity_factor": None}
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("empty_heldout", [False, True])
def test_without_corpus_or_heldout_the_embedded_split_comes_with_a_warning(setup, capsys,
                                                                           monkeypatch,
                                                                           empty_heldout):
    """An empty heldout.jsonl (a run with val_fraction = 0 holds nothing out) is no held-out
    documents too: before, eval refused it as a corpus file that "holds no rows"."""
    import dsv3.eval.loading
    tmp_path, _ = setup
    heldout = tmp_path / "ckpt" / "heldout.jsonl"
    held = f"no {heldout}"
    if empty_heldout:
        heldout.write_text("")
        held = f"an empty {heldout} (its run held no documents out)"

    def load(*args, **kwargs):  # the warning comes before the model: no need to run it
        raise KeyboardInterrupt
    monkeypatch.setattr(dsv3.eval.loading, "load_checkpoint", load)
    assert eval_main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"),
                      "--tasks", "ppl"]) == 130  # a Ctrl-C: no traceback
    assert capsys.readouterr().err == (
        f"dsv3 eval: warning: no --corpus and {held}: using "
        f"the embedded corpus' held-out split, which may overlap the model's training data "
        f"(perplexity and cloze then flatter it)\ndsv3 eval: interrupted\n")


def assert_cut_prompts_reported(tmp_path, capsys, task, options, count, message):
    """``dsv3 eval --tasks TASK`` counts ``count`` cut prompts in eval.json and warns
    ``message`` on stderr and in eval.md."""
    out = tmp_path / "out"
    assert eval_main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(out), "--tasks",
                      task, *options, "--no-progress"]) == 0
    assert json.loads((out / "eval.json").read_text())["tasks"][task]["truncated_prompts"] \
        == count
    assert f"dsv3 eval: warning: {message}" in capsys.readouterr().err
    assert message in (out / "eval.md").read_text()


def test_cut_cloze_passages_get_advice_that_fits_cloze():
    # Before: the multiple-choice advice ("lower --k-shot or shorten the questions"),
    # though cloze has neither exemplars nor questions of the user's.
    from dsv3.eval.report import result_warnings
    results = {"tasks": {"cloze": {"accuracy": {"value": 0.5, "n": 40}, "truncated_prompts": 3},
                         "mc:x.jsonl": {"accuracy": {"value": 0.5, "n": 4},
                                        "truncated_prompts": 1}}}
    cloze, mc = result_warnings(results)
    assert cloze.startswith("cloze: 3 of 40 passages were longer than the model's context")
    assert "k-shot" not in cloze and "max_seq_len" in cloze
    assert mc.endswith("lower --k-shot or shorten the questions")


def test_prompts_cut_to_fit_the_context_are_reported(setup, capsys):
    tmp_path, _ = setup
    dev = [{"question": "the cat sat on the mat " * 8, "choices": ["yes", "no"], "answer": 0,
            "split": "dev"}]
    rows = [{"question": "q", "choices": ["a", "b"], "answer": 0}] * 2
    mc = write_jsonl(tmp_path / "mc.jsonl", rows + dev)
    assert_cut_prompts_reported(tmp_path, capsys, f"mc:{mc}", ["--k-shot", "1"], 2,
                                f"mc:{mc}: 2 of 2 prompts were longer than the model's "
                                f"context and lost their start")


def test_sources_cut_to_leave_room_for_generation_are_reported(setup, capsys):
    tmp_path, _ = setup
    gen = write_jsonl(tmp_path / "long.jsonl", [
        {"source": "the cat sat on the mat " * 10, "reference": "and slept"},
        {"source": "a dog", "reference": "ran"}])
    assert_cut_prompts_reported(tmp_path, capsys, f"gen:{gen}", ["--max-new-tokens", "8"], 1,
                                f"gen:{gen}: 1 of 2 prompts left the model's context too "
                                f"little room for the tokens to generate and lost their start: "
                                f"lower --max-new-tokens or shorten the prompts")


def test_results_of_older_versions_still_warn_of_context_stops():
    """eval.json files written before prompts were cut to leave room counted the
    generations the context ended; ``dsv3 report --eval`` still says so."""
    results = {"tasks": {"gen:x": {"bleu": 1.0, "chrf": 2.0, "n": 4, "stopped_at_context": 3}}}
    assert ("gen:x: 3 of 4 generations were cut short by the model's context"
            in markdown_table(results))


def test_every_option_says_what_it_does():
    from dsv3.eval.cli import add_arguments
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert [a.dest for a in parser._actions if not a.help] == []


def test_the_report_shows_only_the_histories_of_tasks_run(tmp_path):
    """The state file keeps every task's schedule; eval.md showed them all, as if run."""
    from test_eval_support import UniformModel
    text_codec = codec()
    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    state = tmp_path / "state.json"
    history = [{"evaluation": 0, "level": 1, "accuracy": 0.9, "promoted": True}]
    state.write_text(json.dumps({"cloze": {"levels": [1, 2, 3], "threshold": 0.85,
                                           "current": 2, "history": history}}))
    options = EvalOptions(documents=[], difficulty_state=str(state), progress=False)
    result = run_evaluation(UniformModel(text_codec.vocab_size), text_codec, [f"mc:{mc}"],
                            options)
    assert set(result["difficulty"]) == {"cloze", f"mc:{mc}"}  # eval.json keeps them all
    for page in (markdown_table(result), html_fragment(result)):
        assert f"mc:{mc}" in page and "cloze" not in page


def test_results_that_cannot_be_rendered_leave_the_old_files(tmp_path):
    """eval.md was opened (emptied) before its table was rendered: an error left it
    0 bytes, beside a new eval.json."""
    from dsv3.eval.report import write_results
    (tmp_path / "eval.json").write_text("old")
    (tmp_path / "eval.md").write_text("old")
    broken = {"tasks": {"cloze": {}}, "difficulty": {"cloze": {"threshold": 0.5}}}
    with pytest.raises(ValueError, match="difficulty\\['cloze'\\] lacks the field 'history'"):
        write_results(str(tmp_path), broken)
    assert (tmp_path / "eval.json").read_text() == (tmp_path / "eval.md").read_text() == "old"


def test_a_table_that_cannot_be_written_goes_with_the_old_one(tmp_path, monkeypatch):
    """Each file is written whole, eval.json first. If eval.md then fails (a full disk,
    a kill), the new results must not stand beside the old table: it is removed."""
    from dsv3.eval import report
    (tmp_path / "eval.json").write_text("old")
    (tmp_path / "eval.md").write_text("old")
    real = report.write_text_whole

    def full_disk_for_the_table(path, text):
        if str(path).endswith("eval.md"):
            raise OSError(28, "No space left on device")
        real(path, text)

    monkeypatch.setattr(report, "write_text_whole", full_disk_for_the_table)
    results = {"tasks": {"ppl": {"all": {"perplexity": 2.0, "bits_per_byte": 1.0,
                                         "tokens": 4, "bytes": 4}}}}
    with pytest.raises(OSError, match="No space left"):
        report.write_results(str(tmp_path), results)
    assert json.loads((tmp_path / "eval.json").read_text())["tasks"] == results["tasks"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]  # no .tmp either


def test_a_nan_perplexity_reads_nan_in_eval_md_and_in_the_html_from_eval_json(tmp_path):
    """eval.json writes NaN as null: the HTML built from it (`dsv3 report`) showed an
    empty cell where eval.md says nan."""
    from dsv3.eval.report import write_results
    nan = float("nan")
    results = {"tasks": {"ppl": {"all": {"perplexity": nan, "bits_per_byte": nan,
                                         "tokens": 0, "bytes": 0}}}}
    json_path, md_path = write_results(str(tmp_path), results)
    assert "| ppl | perplexity [all] (n: tokens) | nan |  | 0 |" in open(md_path).read()
    fragment = html_fragment(json.loads(open(json_path).read()))
    assert "<td>perplexity [all] (n: tokens)</td><td>nan</td><td></td><td>0</td>" in fragment


def test_results_that_cannot_be_written_leave_the_difficulty_state(setup, capsys):
    """The schedules were saved before eval.json / eval.md: results that could not be
    written (eval.md a directory) still moved the leveled task's history on."""
    tmp_path, files = setup
    out = tmp_path / "out"
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--out", str(out), "--corpus",
            files["corpus"], "--tasks", f"mc:{files['mc']}", "--no-progress"]
    assert eval_main(argv) == 0
    state_before = (out / "difficulty.json").read_text()
    (out / "eval.md").unlink()
    (out / "eval.md").mkdir()
    assert eval_main(argv) != 0
    assert "eval.md" in capsys.readouterr().err
    assert (out / "difficulty.json").read_text() == state_before
