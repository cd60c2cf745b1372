"""dsv3.eval's task matrix around the model: cloze climbs past level 1 (and a state
saved with only level 1 is repaired), two mc files of one name keep separate schedules
(an old state keyed by the base name is carried over when unambiguous), and every
input (--device, --out, each task's options and files, --max-new-tokens against the
context) is checked before the checkpoint is loaded, by ``python -m dsv3.eval`` and
``dsv3 eval`` alike."""
import json

import pytest

from dsv3.eval.cli import main as eval_main
from dsv3.eval.runner import EvalOptions, run_evaluation
from test_eval_support import (UniformModel, codec, save_checkpoint, tiny_model, train_tokenizer,
                               write_jsonl)

CORPUS = [{"domain": "prose",
           "text": "the cat sat on the mat and then the dog ran in the park " * 6},
          {"domain": "prose", "text": "once upon a time a quick brown fox jumped over a dog " * 6},
          {"domain": "code", "text": "def add(a, b): return a + b  # adds two numbers " * 6}]
DOCS = [(row["domain"], row["text"]) for row in CORPUS]
MC_ROWS = [{"question": f"q{i}", "choices": ["yes", "no"], "answer": 0, "level": level}
           for i, level in enumerate([1, 1, 2, 2])]


@pytest.fixture
def uniform():
    """All-equal logits: every item ties, so accuracy is chance (> 0) at every level."""
    text_codec = codec()
    return UniformModel(text_codec.vocab_size), text_codec


@pytest.fixture
def checkpoint(tmp_path):
    save_checkpoint(tmp_path / "ckpt", tiny_model(), train_tokenizer())
    return str(tmp_path / "ckpt")


@pytest.fixture
def no_loading(monkeypatch):
    """Loading the checkpoint is a failure: the error must come before it."""
    import dsv3.eval.loading

    def load(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the inputs were checked")
    monkeypatch.setattr(dsv3.eval.loading, "load_checkpoint", load)


def test_cloze_climbs_past_level_1_from_the_command(tmp_path, checkpoint):
    out = tmp_path / "out"
    argv = ["--checkpoint", checkpoint, "--out", str(out), "--corpus",
            write_jsonl(tmp_path / "corpus.jsonl", CORPUS), "--tasks", "cloze",
            "--cloze-items", "4", "--threshold", "0.01", "--no-progress"]
    assert eval_main(argv) == 0 and eval_main(argv) == 0
    state = json.loads((out / "difficulty.json").read_text())["cloze"]
    assert state["levels"] == [1, 2, 3]
    assert [(h["level"], h["promoted"]) for h in state["history"]] == [(1, True), (2, True)]
    assert state["current"] == 3


def test_cloze_state_saved_with_only_level_1_is_repaired(tmp_path, uniform):
    state = tmp_path / "difficulty.json"
    history = [{"evaluation": 0, "level": 1, "accuracy": 0.9, "promoted": False}]
    state.write_text(json.dumps({"cloze": {"levels": [1], "threshold": 0.25, "current": 1,
                                           "history": history}}))
    options = EvalOptions(documents=DOCS, cloze_items=4, threshold=0.25,
                          difficulty_state=str(state), progress=False)
    levels = [run_evaluation(*uniform, ["cloze"], options)["tasks"]["cloze"]["level"]
              for _ in range(3)]
    assert levels == [1, 2, 3]  # chance is 1/2, then 1/4: each reaches the threshold
    saved = json.loads(state.read_text())["cloze"]
    assert saved["levels"] == [1, 2, 3] and len(saved["history"]) == 4


def test_two_mc_files_of_one_name_keep_their_own_schedules(tmp_path, uniform):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = write_jsonl(tmp_path / "a" / "t.jsonl", MC_ROWS)
    second = write_jsonl(tmp_path / "b" / "t.jsonl", MC_ROWS[:2])  # level 1 only
    options = EvalOptions(documents=[], threshold=0.5, difficulty_state=str(tmp_path / "s.json"),
                          progress=False)
    result = run_evaluation(*uniform, [f"mc:{first}", f"mc:{second}"], options)
    schedules = result["difficulty"]
    assert set(schedules) == {f"mc:{first}", f"mc:{second}"}
    assert schedules[f"mc:{first}"]["levels"] == [1, 2]
    assert schedules[f"mc:{second}"]["levels"] == [1]
    assert [len(s["history"]) for s in schedules.values()] == [1, 1]


def test_a_state_keyed_by_base_name_passes_to_the_one_file_of_that_name(tmp_path, uniform):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = write_jsonl(tmp_path / "a" / "t.jsonl", MC_ROWS)
    second = write_jsonl(tmp_path / "b" / "t.jsonl", MC_ROWS)
    old = {"levels": [1, 2], "threshold": 0.5, "current": 2,
           "history": [{"evaluation": 0, "level": 1, "accuracy": 1.0, "promoted": True}]}
    state = tmp_path / "s.json"
    options = EvalOptions(documents=[], threshold=0.5, difficulty_state=str(state),
                          progress=False)
    state.write_text(json.dumps({"mc:t.jsonl": old}))
    result = run_evaluation(*uniform, [f"mc:{first}"], options)
    assert result["tasks"][f"mc:{first}"]["level"] == 2  # carried over
    assert "mc:t.jsonl" not in json.loads(state.read_text())
    # Two files of that name: whose history it is cannot be told, so neither takes it.
    state.write_text(json.dumps({"mc:t.jsonl": old}))
    result = run_evaluation(*uniform, [f"mc:{first}", f"mc:{second}"], options)
    assert [result["tasks"][f"mc:{p}"]["level"] for p in (first, second)] == [1, 1]
    assert json.loads(state.read_text())["mc:t.jsonl"] == old


def test_python_m_dsv3_eval_checks_the_device(tmp_path, capsys, monkeypatch, checkpoint,
                                              no_loading):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["--checkpoint", checkpoint, "--out", str(tmp_path / "o"), "--device", "cuda"]
    assert eval_main(argv) == 2
    assert capsys.readouterr().err == ("dsv3 eval: error: --device 'cuda' is not available on "
                                       "this machine; available: cpu\n")


@pytest.mark.parametrize("make_out, message", [
    (lambda tmp: tmp.joinpath("file").write_text("x") and tmp / "file",
     "--out: {out} exists and is not a directory"),
    (lambda tmp: tmp.joinpath("file").write_text("x") and tmp / "file" / "sub",
     "--out: cannot create {out}: {tmp}/file is a file"),
])
def test_an_unusable_out_fails_before_loading(tmp_path, capsys, checkpoint, no_loading,
                                              make_out, message):
    out = make_out(tmp_path)
    argv = ["--checkpoint", checkpoint, "--out", str(out), "--tasks", "ppl", "--no-progress"]
    assert eval_main(argv) == 2
    assert message.format(out=out, tmp=tmp_path) in capsys.readouterr().err


@pytest.mark.parametrize("tasks, extra, message", [
    ("ppl,bias", [], "bias: give --bias-spec PATH"),
    ("ppl,bias", ["--bias-spec", "{bias}"], "bias spec: {bias}: templates[0] needs text after"),
    ("ppl,toxicity", [], "--toxicity-lexicon PATH or --toxicity-classifier DIR"),
    ("ppl,toxicity", ["--toxicity-lexicon", "{tmp}/none.txt"], "lexicon: no file"),
    ("ppl,cloze", ["--corpus", "{one_doc}"], "cloze: documents: level 1 needs"),
    ("ppl,mc:{tmp}/none.jsonl", [], "multiple-choice file: no file '{tmp}/none.jsonl'"),
    ("ppl,gen:{gen}", [], "generation file: {gen}:1: field 'reference' must be a string"),
    ("ppl,mc:{mc}", ["--k-shot", "2"], "mc:{mc}: --k-shot 2: k_shot=2 exceeds the 0 dev"),
])
def test_every_task_is_checked_before_the_model_loads(tmp_path, capsys, checkpoint, no_loading,
                                                      tasks, extra, message):
    names = {"tmp": tmp_path, "one_doc": write_jsonl(tmp_path / "one.jsonl", CORPUS[:1]),
             "bias": tmp_path / "bias.json", "mc": write_jsonl(tmp_path / "mc.jsonl", MC_ROWS),
             "gen": write_jsonl(tmp_path / "gen.jsonl", [{"source": "a", "reference": 5}])}
    (tmp_path / "bias.json").write_text(json.dumps({"templates": ["Ends with {term}"],
                                                    "terms": ["a", "b"]}))
    argv = ["--checkpoint", checkpoint, "--out", str(tmp_path / "o"), "--no-progress",
            "--tasks", tasks.format(**names)] + [a.format(**names) for a in extra]
    if "--corpus" not in extra:
        argv += ["--corpus", write_jsonl(tmp_path / "corpus.jsonl", CORPUS)]
    assert eval_main(argv) == 2
    assert message.format(**names) in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_dsv3_eval_runs_the_same_checks(tmp_path, capsys, checkpoint, no_loading):
    from dsv3.cli import main as dsv3_main
    argv = ["eval", "--checkpoint", checkpoint, "--out", str(tmp_path / "o"), "--tasks",
            "ppl,bias", "--corpus", write_jsonl(tmp_path / "corpus.jsonl", CORPUS)]
    assert dsv3_main(argv) == 2
    assert "dsv3 eval: error: bias: give --bias-spec PATH" in capsys.readouterr().err


def test_cloze_takes_no_dev_exemplars_from_k_shot(uniform):
    options = EvalOptions(documents=DOCS, cloze_items=2, k_shot=1, progress=False)
    assert run_evaluation(*uniform, ["cloze"], options)["tasks"]["cloze"]["k_shot"] == 0


BAD_UTF8 = b'{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"x": "bad \xff"}\n'


@pytest.mark.parametrize("option, what, content", [
    ("--corpus", "--corpus", b'{"domain": "a", "text": "fine"}\n{"domain": "a", '
                             b'"text": "bad \xff"}\n'),
    ("mc", "multiple-choice file", BAD_UTF8),
    ("--toxicity-lexicon", "lexicon", b"fine\nbad \xff\n"),
    ("--bias-spec", "bias spec", b'{"templates": ["The {term} ran"],\n "terms": ["\xff", "b"]}'),
])
def test_invalid_utf8_is_named_by_file_and_line(tmp_path, capsys, checkpoint, no_loading,
                                                 option, what, content):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    tasks = {"--corpus": "ppl", "mc": f"mc:{bad}", "--toxicity-lexicon": "toxicity",
             "--bias-spec": "bias"}[option]
    argv = ["--checkpoint", checkpoint, "--out", str(tmp_path / "o"), "--tasks", tasks,
            "--corpus", str(bad) if option == "--corpus" else corpus]
    if option.startswith("--") and option != "--corpus":
        argv += [option, str(bad)]
    assert eval_main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {what}: {bad}:2: not valid UTF-8 (invalid start byte: byte 0xff" in err


def test_a_file_that_is_not_regular_reads_as_its_contents(tmp_path):
    """/dev/null (or a pipe) was "no file '/dev/null'", though it is there; a directory
    is said to be one."""
    from dsv3.eval.jsonl import read_lines
    assert read_lines("/dev/null", "--corpus") == []
    with pytest.raises(ValueError, match=f"--corpus: {str(tmp_path)!r} is a directory"):
        read_lines(str(tmp_path), "--corpus")
    with pytest.raises(FileNotFoundError, match="--corpus: no file "):
        read_lines(str(tmp_path / "none.jsonl"), "--corpus")


def test_a_byte_order_mark_opens_a_task_file_and_is_not_its_first_row(tmp_path):
    """A jsonl task file saved by a Windows tool starts with a BOM: its first row was
    "is not JSON". A BOM further in is still that row's fault."""
    from dsv3.eval.jsonl import read_jsonl_rows
    path = tmp_path / "task.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "one"}\r\n{"text": "two"}\n')
    assert [row for _, row in read_jsonl_rows(str(path), ("text",))] == [{"text": "one"},
                                                                         {"text": "two"}]
    path.write_bytes(b'{"text": "one"}\n\xef\xbb\xbf{"text": "two"}\n')
    with pytest.raises(ValueError, match=r"task.jsonl:2 is not JSON"):
        read_jsonl_rows(str(path), ("text",))


@pytest.mark.parametrize("row, message", [
    ({"domain": "a", "text": None}, "field 'text' must be a string, got NoneType None"),
    ({"domain": "a", "text": 123}, "field 'text' must be a string, got int 123"),
    ({"domain": None, "text": "some text"}, "field 'domain' must be a string, got NoneType"),
])
def test_corpus_rows_must_hold_strings(tmp_path, capsys, checkpoint, no_loading, row, message):
    """A null text was scored as the word "None"."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", CORPUS[:1] + [row])
    argv = ["--checkpoint", checkpoint, "--out", str(tmp_path / "o"), "--tasks", "ppl",
            "--corpus", corpus]
    assert eval_main(argv) == 2
    assert f"--corpus: {corpus}:2: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("task, extra, message", [
    ("mc:{mc}", [], "multiple-choice file: {mc}:2: choice 1 has {n} tokens, more than the "
                    "checkpoint's max_seq_len=32: it cannot be scored"),
    ("bias", ["--bias-spec", "{bias}"], "bias spec: {bias}: templates[0]: the text after {{term}} "
                                        "has {n} tokens, more than the checkpoint's max_seq_len"),
])
def test_a_continuation_longer_than_the_context_fails_before_any_task(
        tmp_path, capsys, checkpoint, no_loading, task, extra, message):
    """It used to fail only after the model loaded and ppl ran (results lost), naming
    neither file nor line."""
    from dsv3.eval.loading import read_checkpoint
    long = "the cat sat on the mat " * 10
    _, text_codec = read_checkpoint(checkpoint)
    names = {"mc": write_jsonl(tmp_path / "mc.jsonl", [
                 {"question": "q", "choices": ["a", "b"], "answer": 0},
                 {"question": "q2", "choices": ["a", long], "answer": 0}]),
             "bias": tmp_path / "bias.json"}
    (tmp_path / "bias.json").write_text(json.dumps({"templates": ["The {term}" + long],
                                                    "terms": ["cat", "dog"]}))
    n = len(text_codec.encode(" " + long)) if task.startswith("mc") else len(
        text_codec.encode(long))
    argv = ["--checkpoint", checkpoint, "--out", str(tmp_path / "o"), "--no-progress",
            "--tasks", "ppl," + task.format(**names),
            "--corpus", write_jsonl(tmp_path / "corpus.jsonl", CORPUS)]
    argv += [a.format(**names) for a in extra]
    assert eval_main(argv) == 2
    assert message.format(n=n, **names) in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_lm_eval_limit_must_be_positive(tmp_path, capsys, checkpoint, no_loading):
    argv = ["--checkpoint", checkpoint, "--out", str(tmp_path / "o"), "--tasks", "ppl",
            "--corpus", write_jsonl(tmp_path / "corpus.jsonl", CORPUS), "--lm-eval-limit", "-1"]
    assert eval_main(argv) == 2
    assert "--lm-eval-limit must be >= 1, got -1" in capsys.readouterr().err


def test_max_new_tokens_past_the_context_fails_before_the_model_loads(tmp_path, capsys,
                                                                     checkpoint, no_loading):
    """The generating tasks would refuse it only once ppl had run (its results lost)."""
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"source": "a dog", "reference": "ran"}])
    (tmp_path / "lexicon.txt").write_text("zorblax\n")
    argv = ["--checkpoint", checkpoint, "--out", str(tmp_path / "o"),
            "--tasks", f"ppl,gen:{gen},toxicity", "--max-new-tokens", "33",
            "--toxicity-lexicon", str(tmp_path / "lexicon.txt"),
            "--corpus", write_jsonl(tmp_path / "corpus.jsonl", CORPUS)]
    assert eval_main(argv) == 2
    assert (f"dsv3 eval: error: --max-new-tokens 33 is more than the checkpoint's "
            f"max_seq_len=32 can generate (at most 32, after a one-token prompt), for "
            f"gen:{gen}, toxicity\n") == capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_lone_surrogate_in_a_corpus_is_named_by_file_and_line(tmp_path, capsys, checkpoint,
                                                              no_loading):
    """Valid JSON, but half a UTF-16 pair: the tokenizer failed on it with a type error."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"domain": "a", "text": "fine"}\n{"domain": "a", "text": "bad \\udc00"}\n')
    argv = ["--checkpoint", checkpoint, "--out", str(tmp_path / "o"), "--tasks", "ppl",
            "--corpus", str(corpus)]
    assert eval_main(argv) == 2
    assert (f"--corpus: {corpus}:2: a lone surrogate escape (\\udc00) is not text"
            in capsys.readouterr().err)


@pytest.mark.parametrize("content, message", [
    (b'{"model": {"type": "WordLevel", "vocab": {"a"',
     "is not a readable tokenizers file (cut short or overwritten? EOF while parsing"),
    (b"", "tokenizer.json is empty"),
    (b"\xff\xfe{}", "tokenizer.json:1: not valid UTF-8 (invalid start byte: byte 0xff"),
    (b"[]", "is not a readable tokenizers file (cut short or overwritten? invalid type: "
            "sequence, expected struct Tokenizer"),
    (b'{"model": 1}', "is not a readable tokenizers file (")])
def test_a_damaged_tokenizer_is_one_error_line(tmp_path, capsys, checkpoint, no_loading,
                                               content, message):
    """tokenizers' own error was a traceback naming no file ("Exception: EOF while
    parsing an object at line 11 column 10")."""
    path = tmp_path / "ckpt" / "tokenizer.json"
    path.write_bytes(content)
    argv = ["--checkpoint", checkpoint, "--out", str(tmp_path / "o"), "--tasks", "ppl",
            "--corpus", write_jsonl(tmp_path / "corpus.jsonl", CORPUS)]
    assert eval_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dsv3 eval: error: checkpoint: {path}") and err.count("\n") == 1, err
    assert message in err


@pytest.mark.parametrize("state, message", [
    ({"levels": [1, 2], "history": "x"}, "'cloze': history must be a list of entries, got str"),
    ({"levels": [1, 2], "history": [1, 2]}, "'cloze': history entry 0 must be an object"),
    ({"levels": [1, 2], "history": [{"evaluation": 0, "level": 1, "accuracy": "0.5",
                                     "promoted": False}]},
     "'cloze': history entry 0: accuracy must be a number in [0, 1], got '0.5'"),
])
def test_a_malformed_history_fails_before_the_model_runs(tmp_path, capsys, checkpoint,
                                                         no_loading, state, message):
    """It passed the checks and failed once the model had run: difficulty.json saved,
    then eval.md left empty by the report that could not render the history."""
    out = tmp_path / "o"
    out.mkdir()
    text = json.dumps({"cloze": state})
    (out / "difficulty.json").write_text(text)
    argv = ["--checkpoint", checkpoint, "--out", str(out), "--tasks", "ppl,cloze",
            "--corpus", write_jsonl(tmp_path / "corpus.jsonl", CORPUS), "--no-progress"]
    assert eval_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dsv3 eval: error: difficulty state: {out / 'difficulty.json'}: ")
    assert message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in out.iterdir()) == ["difficulty.json"]
    assert (out / "difficulty.json").read_text() == text


def test_toxicity_generates_from_a_seeded_sample_of_at_most_toxicity_prompts_max(
        uniform, tmp_path):
    """One sampled generation per held-out document, with no cap: thousands of them
    took hours."""
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("awful\n")
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": f"prompt number {i}"} for i in range(9)])

    def run(**kw):
        options = EvalOptions(toxicity_lexicon=str(lexicon), toxicity_prompts=prompts,
                              max_new_tokens=2, progress=False, **kw)
        return run_evaluation(*uniform, ["toxicity"], options)["tasks"]["toxicity"]
    capped = run(toxicity_prompts_max=4, seed=1)
    assert (capped["n"], capped["prompts_available"]) == (4, 9)
    assert run(toxicity_prompts_max=4, seed=1) == capped  # the same sample
    whole = run(toxicity_prompts_max=9)
    assert (whole["n"], whole["prompts_available"]) == (9, 9)
    with pytest.raises(ValueError, match="--toxicity-prompts-max must be >= 1, got 0"):
        run(toxicity_prompts_max=0)
