"""dsv3.eval multiple choice: a model that knows the answers scores 100% (zero- and
few-shot), all-equal logits score chance exactly (ties earn 1/t), length
normalization and tie credit on hand-made scores, Wilson intervals against hand
values, seeded few-shot exemplars, task-file parsing (answers given as text, letter or
index; the two splits) and bad input, prompts cut to fit the context counted."""
import json

import pytest

from dsv3.eval.multiple_choice import (MCItem, accuracy_of, build_prompts,
                                       evaluate_multiple_choice, item_credit, make_item,
                                       read_mc_file)
from dsv3.eval.stats import Z95, wilson_interval
from test_eval_support import OracleModel, UniformModel, codec

ITEMS = [MCItem("What sits on the mat?", ("the cat", "a dog", "the fox", "nothing"), 0),
         MCItem("Who jumps over the lazy dog?", ("the cat", "a quick brown fox", "the mat"), 1),
         MCItem("What does add(1, 2) return?", ("12", "3"), 1),
         MCItem("Which module gives getcwd?", ("sys", "math", "os", "re"), 2),
         MCItem("Where did the dog run?", ("in the park", "on the mat"), 0),
         MCItem("What prints the directory?", ("print(os.getcwd())", "import os", "def"), 0)]
DEV = [MCItem(f"Dev question {i}?", ("yes", "no"), i % 2) for i in range(5)]


def oracle_for(text_codec, items, prompts):
    eos = text_codec.eos_id
    correct = [[eos] + text_codec.encode(p) + text_codec.encode(" " + it.choices[it.answer])
               for it, p in zip(items, prompts)]
    return OracleModel(text_codec.vocab_size, correct, max_seq_len=128)


@pytest.mark.parametrize("k_shot", [0, 2])
def test_a_model_that_knows_the_answers_scores_100_percent(k_shot):
    text_codec = codec()
    model = oracle_for(text_codec, ITEMS, build_prompts(ITEMS, DEV, k_shot, seed=1))
    result = evaluate_multiple_choice(model, text_codec, ITEMS, DEV, k_shot=k_shot, seed=1)
    assert result["accuracy"]["rate"] == 1.0
    n = len(ITEMS)  # Wilson at 100%: [n / (n + z^2), 1]
    assert result["accuracy"]["ci95"] == pytest.approx([n / (n + Z95 ** 2), 1.0])


def test_uniform_logits_score_chance_exactly():
    text_codec = codec()
    result = evaluate_multiple_choice(UniformModel(text_codec.vocab_size, 128), text_codec, ITEMS)
    chance = sum(1 / len(it.choices) for it in ITEMS) / len(ITEMS)
    assert result["chance"] == pytest.approx(chance)
    assert result["accuracy"]["rate"] == pytest.approx(chance, abs=1e-12)


def test_length_normalization_and_tie_credit_on_hand_scores():
    items = [MCItem("q", ("long right answer", "no"), 0), MCItem("q2", ("a", "b", "c"), 2)]
    per_item = [{"sums": [-4.0, -3.0], "lengths": [4, 1]},  # per token: -1 vs -3; sums: -4 vs -3
                {"sums": [-2.0, -1.0, -1.0], "lengths": [1, 1, 1]}]  # b and c tie
    result = accuracy_of(items, per_item)
    assert result["accuracy"]["rate"] == pytest.approx((1 + 0.5) / 2)
    assert result["accuracy_unnormalized"]["rate"] == pytest.approx((0 + 0.5) / 2)
    assert item_credit([-1.0, -1.0, -1.0, -1.0], 3) == 0.25
    assert item_credit([-1.0, -2.0], 1) == 0.0


def test_wilson_interval_hand_values():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(Z95 ** 2 / (10 + Z95 ** 2))
    with pytest.raises(ValueError, match="successes must be in"):
        wilson_interval(11, 10)


def test_few_shot_exemplars_are_seeded_and_never_the_item():
    pool = ITEMS + DEV
    first = build_prompts(ITEMS, pool, k_shot=3, seed=7)
    assert build_prompts(ITEMS, pool, k_shot=3, seed=7) == first
    assert build_prompts(ITEMS, pool, k_shot=3, seed=8) != first
    for item, prompt in zip(ITEMS, first):
        assert prompt.count(item.question) == 1 and prompt.endswith(item.question + "\nAnswer:")
        assert prompt.count("Question:") == 4


def test_task_file_answers_levels_and_dev_split(tmp_path):
    rows = [{"question": "q1", "choices": ["a", "b"], "answer": "B", "level": 2},
            {"question": "q2", "choices": ["x", "y", "z"], "answer": "z", "level": 1},
            {"question": "q3", "choices": ["u", "v"], "answer": 0, "split": "dev"}]
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    test, dev = read_mc_file(str(path))
    assert [(it.answer, it.level) for it in test] == [(1, 2), (2, 1)]
    assert [it.question for it in dev] == ["q3"]


@pytest.mark.parametrize("row, message", [
    ({"question": "q", "choices": ["a"], "answer": 0}, "choices must be a list of at least 2"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "outside the 2 choices"),
    ({"question": "q", "choices": ["a", "b"], "answer": "c"}, "answer must be an index"),
    ({"question": "q", "choices": ["a", "b"], "answer": 0, "level": "hard"},
     "level must be an int"),
])
def test_bad_items_name_the_field(row, message):
    with pytest.raises(ValueError, match=message):
        make_item(row)


def test_bad_harness_arguments():
    with pytest.raises(ValueError, match="k_shot=3 exceeds the 2 dev exemplars"):
        build_prompts(ITEMS[:1], DEV[:2], k_shot=3)
    with pytest.raises(ValueError, match="template must contain"):
        build_prompts(ITEMS, template="no placeholder")


def test_a_prompt_longer_than_the_context_keeps_its_end():
    from dsv3.eval.scoring import score_continuations
    from test_eval_support import tiny_model
    model = tiny_model(max_seq_len=8)
    context, choice = list(range(1, 21)), [30, 31, 32]
    (cut,) = score_continuations(model, [(context, choice)])
    (explicit,) = score_continuations(model, [(context[-6:], choice)])  # 6 + 3 - 1 = 8 inputs
    assert cut.logprobs.tolist() == explicit.logprobs.tolist()
    with pytest.raises(ValueError, match=r"requests\[0\]: the continuation has 9 tokens"):
        score_continuations(model, [(context, list(range(9)))])


def test_task_file_rows_are_named_by_their_line(tmp_path):
    path = tmp_path / "task.jsonl"
    good = {"question": "q", "choices": ["a", "b"], "answer": 0}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "choices": ["a", "a"]}))
    with pytest.raises(ValueError, match=r"task.jsonl:3: choices must differ, got 'a' more than "
                                         r"once in \['a', 'a'\]"):
        read_mc_file(str(path))
    path.write_text(json.dumps({**good, "question": 7}))
    with pytest.raises(ValueError, match=r"task.jsonl:1: field 'question' must be a string"):
        read_mc_file(str(path))


def test_task_file_mixing_rows_with_and_without_a_level_is_refused(tmp_path):
    rows = [{"question": "q1", "choices": ["a", "b"], "answer": 0, "level": 1},
            {"question": "q2", "choices": ["a", "b"], "answer": 0},
            {"question": "q3", "choices": ["a", "b"], "answer": 0, "split": "dev"}]
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=r"multiple-choice file: .*task.jsonl:2 has no 'level' "
                                         r"but .*task.jsonl:1 has one"):
        read_mc_file(str(path))
    path.write_text("\n".join(json.dumps(r) for r in [rows[0], rows[2]]) + "\n")
    test, dev = read_mc_file(str(path))  # a dev row needs no level
    assert [it.level for it in test] == [1] and [it.level for it in dev] == [None]


def _mc_file(tmp_path, rows):
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("choices, answer, index", [
    (["x", "y", "E"], "E", 2),  # the text of a choice; as a letter it would be past the end
    (["A", "B", "C"], "B", 1),  # text and letter agree
    (["yes", "no"], "B", 1),    # a letter index, no choice of that text
])
def test_an_answer_that_is_a_choices_text_means_that_choice(tmp_path, choices, answer, index):
    row = {"question": "q", "choices": choices, "answer": answer}
    (item,), _ = read_mc_file(_mc_file(tmp_path, [row]))
    assert item.answer == index


def test_an_answer_both_a_choices_text_and_a_letter_of_another_is_refused(tmp_path):
    """choices ["C", "A", "D"], answer "A" was read as letter A = "C", silently."""
    good = {"question": "q0", "choices": ["a", "b"], "answer": 0}
    row = {"question": "Which vitamin is retinol?", "choices": ["C", "A", "D"], "answer": "A"}
    with pytest.raises(ValueError, match=r"task.jsonl:2: answer 'A' is ambiguous: it is the "
                                         r"text of choice 1 but, as a letter, means choice 0 "
                                         r"\('C'\); give the answer as an index"):
        read_mc_file(_mc_file(tmp_path, [good, row]))


@pytest.mark.parametrize("split", ["validation", "train", "DEV", None, 1])
def test_a_split_other_than_test_or_dev_is_refused(tmp_path, split):
    rows = [{"question": "q0", "choices": ["a", "b"], "answer": 0, "split": "test"},
            {"question": "q1", "choices": ["a", "b"], "answer": 0, "split": split}]
    with pytest.raises(ValueError, match=rf"task.jsonl:2: split must be one of \['test', 'dev'\] "
                                         rf"\(or absent: test\), got {split!r}"):
        read_mc_file(_mc_file(tmp_path, rows))


def test_prompts_cut_to_fit_the_context_are_counted():
    """k-shot prompts past max_seq_len lose their first exemplar, which used to go
    unreported: the result counts the items whose prompt was cut."""
    text_codec = codec()
    long_dev = [MCItem("the cat sat on the mat " * 8, ("yes", "no"), 0),
                MCItem("a dog ran in the park " * 8, ("yes", "no"), 1)]
    model = UniformModel(text_codec.vocab_size, max_seq_len=48)
    short = evaluate_multiple_choice(model, text_codec, ITEMS[:3], long_dev, k_shot=0)
    assert short["truncated_prompts"] == 0
    cut = evaluate_multiple_choice(model, text_codec, ITEMS[:3], long_dev, k_shot=1)
    assert cut["truncated_prompts"] == 3 and cut["accuracy"]["n"] == 3
