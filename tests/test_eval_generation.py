"""dsv3.eval generation metrics: BLEU and chrF against hand-computed values, and the
decode-then-score loop on a model that emits the references (100) and one that emits
nothing (0); a source too long for the context loses its start, is still answered in
full, and is counted."""
import json

import pytest

from dsv3.eval.generation import corpus_scores, evaluate_generation, read_pairs
from test_eval_support import OracleModel, UniformModel, codec


def test_bleu_and_chrf_hand_computed():
    # BLEU: clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths so no brevity penalty.
    scores = corpus_scores(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert scores["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6)
    # chrF (char 6-grams, beta 2, spaces ignored): "abc" vs "abd": 1-grams 2/3, 2-grams 1/2,
    # 3-grams 0; precision = recall = mean over those 3 orders = 7/18, so F = 7/18.
    assert corpus_scores(["abc"], ["abd"])["chrf"] == pytest.approx(100 * 7 / 18, abs=1e-6)
    same = corpus_scores(["a dog ran in the park"], ["a dog ran in the park"])
    assert same == pytest.approx({"bleu": 100.0, "chrf": 100.0})


def test_metric_input_errors():
    with pytest.raises(ValueError, match="references: 1 given for 2 hypotheses"):
        corpus_scores(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="hypotheses must be a list of str"):
        corpus_scores("a", ["a"])


def test_generation_loop_scores_what_the_model_emits(tmp_path):
    pairs = [{"source": "The quick brown", "reference": "fox jumps over the lazy dog."},
             {"source": "import os\n", "reference": "print(os.getcwd())"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    text_codec = codec()
    eos = text_codec.eos_id
    correct = [[eos] + text_codec.encode(p["source"]) + text_codec.encode(" " + p["reference"])
               + [eos] for p in pairs]
    oracle = OracleModel(text_codec.vocab_size, correct, max_seq_len=64)
    result = evaluate_generation(oracle, text_codec, read_pairs(str(path)), max_new_tokens=20)
    assert result["bleu"] == pytest.approx(100.0) and result["chrf"] == pytest.approx(100.0)
    assert result["examples"][1]["hypothesis"] == "print(os.getcwd())"
    # All-equal logits: greedy takes the lowest id, the tokenizer's <|endoftext|>: nothing said.
    silent = evaluate_generation(UniformModel(text_codec.vocab_size), text_codec, pairs)
    assert silent["bleu"] == 0.0 and silent["examples"][0]["hypothesis"] == ""


def test_pairs_file_must_have_both_fields(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"source": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1 lacks the field\(s\) \['reference'\]"):
        read_pairs(str(path))


@pytest.mark.parametrize("row, field", [
    ({"source": "x", "reference": 5}, "'reference' must be a string, got int 5"),
    ({"source": "x", "reference": ["a", 1]}, "'reference' must be a string, got list"),
    ({"source": None, "reference": "y"}, "'source' must be a string, got NoneType"),
])
def test_pairs_file_rows_are_checked_when_read_naming_the_line(tmp_path, row, field):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"source": "ok", "reference": "ok"}) + "\n\n" + json.dumps(row))
    with pytest.raises(ValueError, match=rf"generation file: .*bad.jsonl:3: field {field}"):
        read_pairs(str(path))


def test_a_source_longer_than_the_context_loses_its_start_and_is_counted():
    """A source that filled the context used to keep its last max_seq_len tokens and
    get one token to answer with. Now the prompt keeps its last W - N + 1 tokens (W
    positions, N = max_new_tokens), the answer comes whole, and the cut is counted."""
    text_codec = codec()
    eos, window, budget = text_codec.eos_id, 32, 8
    pairs = [{"source": "the cat sat on the mat " * 10, "reference": "the dog ran"},
             {"source": "a dog", "reference": "ran"}]
    prompts = [[eos] + text_codec.encode(p["source"]) for p in pairs]
    assert len(prompts[0]) > window > len(prompts[1])
    # The oracle knows the answers after exactly what each prompt keeps.
    kept = [prompt[-(window - budget + 1):] for prompt in prompts]
    oracle = OracleModel(text_codec.vocab_size, [
        k + text_codec.encode(" " + p["reference"]) + [eos] for k, p in zip(kept, pairs)],
        max_seq_len=window)
    result = evaluate_generation(oracle, text_codec, pairs, max_new_tokens=budget)
    assert [e["hypothesis"] for e in result["examples"]] == ["the dog ran", "ran"]
    assert result["truncated_prompts"] == 1 and result["n"] == 2
    assert "stopped_at_context" not in result  # no generation can run into the context now


def test_a_multi_line_reference_needs_another_stop_and_then_scores_in_full(tmp_path, capsys):
    """Every generation was cut at its first newline, so a model that wrote a two-line
    reference exactly scored BLEU 67 and chrF 33, and nothing said why."""
    from dsv3.cli import main
    pairs = [{"source": "def add(a, b):\n", "reference": "x = a + b\n    return x"}]
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    with pytest.raises(ValueError, match=r"code.jsonl:1: the reference holds '\\n', where "
                                         r"--gen-stop cuts every generation"):
        read_pairs(str(path))
    text_codec = codec()
    eos = text_codec.eos_id
    correct = [[eos] + text_codec.encode(p["source"]) + text_codec.encode(" " + p["reference"])
               + [eos] for p in pairs]
    oracle = OracleModel(text_codec.vocab_size, correct, max_seq_len=64)
    result = evaluate_generation(oracle, text_codec, read_pairs(str(path), stop=""),
                                 max_new_tokens=30, stop=())
    assert result["bleu"] == pytest.approx(100.0) and result["chrf"] == pytest.approx(100.0)
    # the command line: refused before any model loads, naming the option to change
    assert main(["eval", "--checkpoint", str(tmp_path / "none"), "--tasks", f"gen:{path}",
                 "--out", str(tmp_path / "out")]) == 2
    assert "--gen-stop" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse's own usage error
        main(["eval", "--checkpoint", str(tmp_path / "none"), "--tasks", f"gen:{path}",
              "--out", str(tmp_path / "out"), "--gen-stop", r"\q"])
    assert exit_.value.code == 2
    assert "argument --gen-stop: unknown escape '\\q'" in capsys.readouterr().err
