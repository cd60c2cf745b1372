"""dsv3.eval dynamic difficulty: promotion at the threshold, staying at the top,
history entries, JSON round trip of the state, a changed task definition, and the
built-in cloze items per level (deterministic, true continuation, distractor source)."""
import pytest

from dsv3.eval.cloze import LEVELS, cloze_items
from dsv3.eval.corpus import embedded_documents, held_out_documents, is_held_out
from dsv3.eval.difficulty import DifficultySchedule, load_schedules, save_schedules, schedule_for

DOCS = [("prose", "the cat sat on the mat and then the dog ran in the park " * 8),
        ("prose", "once upon a time a quick brown fox jumped over a lazy dog " * 8),
        ("code", "def add(a, b): return a + b  # adds two numbers together " * 8)]


def test_promotes_when_accuracy_reaches_threshold_and_stays_at_top():
    schedule = DifficultySchedule([1, 2, 3], threshold=0.85)
    assert schedule.current == 1
    assert schedule.record(0.84) is False and schedule.current == 1
    assert schedule.record(0.85) is True and schedule.current == 2
    assert schedule.record(0.9) is True and schedule.current == 3
    assert schedule.record(1.0) is False and schedule.current == 3  # no level above
    assert [(h["evaluation"], h["level"], h["promoted"]) for h in schedule.history] == [
        (0, 1, False), (1, 1, True), (2, 2, True), (3, 3, False)]


def test_state_round_trips_and_follows_a_changed_task(tmp_path):
    path = str(tmp_path / "difficulty.json")
    assert load_schedules(path) == {}
    schedules = {}
    schedule_for(schedules, "cloze", [1, 2, 3], 0.85).record(0.9)
    save_schedules(path, schedules)
    loaded = load_schedules(path)
    assert loaded["cloze"].current == 2 and loaded["cloze"].history == schedules["cloze"].history
    # The task lost level 2: restart at its lowest level, keep the history.
    moved = schedule_for(loaded, "cloze", [1, 3], 0.9)
    assert moved.current == 1 and len(moved.history) == 1 and moved.threshold == 0.9


def test_bad_schedule_input():
    with pytest.raises(ValueError, match="threshold must be in"):
        DifficultySchedule([1], threshold=1.5)
    with pytest.raises(ValueError, match="levels must be a non-empty list of ints"):
        DifficultySchedule([])
    with pytest.raises(ValueError, match="accuracy must be in"):
        DifficultySchedule([1]).record(85)


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_cloze_items_per_level(level):
    spec = LEVELS[level]
    items = cloze_items(DOCS, level, n_items=6, seed=3)
    assert items == cloze_items(DOCS, level, n_items=6, seed=3)
    assert len(items) == 6
    words = lambda text: " ".join(text.split())  # noqa: E731 (spans keep the doc's spacing)
    joined = [words(text) for _, text in DOCS]
    for item in items:
        assert len(item.choices) == spec.n_choices and len(set(item.choices)) == spec.n_choices
        assert item.level == level
        assert len(item.question.split()) == spec.context_words
        truth = item.choices[item.answer]
        source = [t for t in joined if words(item.question) + " " + words(truth) in t]
        assert source, "the answer must be the passage's true continuation"
        for choice in item.choices:
            assert len(choice.split()) == spec.answer_words
            in_same = words(choice) in source[0]
            if spec.distractors == "same-document":
                assert in_same
            if spec.distractors == "other-domain" and choice != truth:
                assert not in_same


def test_cloze_bad_input():
    with pytest.raises(ValueError, match="level must be one of"):
        cloze_items(DOCS, 9)
    with pytest.raises(ValueError, match="at least 56 words"):
        cloze_items([("d", "too short")], 1)


def test_embedded_corpus_is_deterministic_with_a_held_out_tenth():
    documents = embedded_documents()
    assert {d for d, _ in documents} == {"pydoc-topics", "stdlib-docs"}
    held = held_out_documents()
    assert held == [d for d in documents if is_held_out(d[1])]
    assert 0 < len(held) < len(documents) / 4


@pytest.mark.parametrize("history, message", [
    ("x", "history must be a list of entries, got str"),
    ([1, 2], "history entry 0 must be an object with evaluation, level, accuracy, promoted; "
             "got 1"),
    ([{"evaluation": 0, "level": 1, "accuracy": 0.5}], "history entry 0 lacks 'promoted'"),
    ([{"evaluation": 0, "level": 1, "accuracy": 0.5, "promoted": "no"}],
     "history entry 0: promoted must be true or false, got 'no'"),
    ([{"evaluation": 0, "level": 1.5, "accuracy": 0.5, "promoted": False}],
     "history entry 0: level must be a whole number, got 1.5"),
])
def test_a_malformed_history_is_named_with_its_entry(tmp_path, history, message):
    """The report renders every entry (accuracy as a number, promoted as yes/no): a
    bad one failed only there, after the model had run."""
    import json
    path = tmp_path / "difficulty.json"
    path.write_text(json.dumps({"cloze": {"levels": [1, 2], "history": history}}))
    with pytest.raises(ValueError) as error:
        load_schedules(str(path))
    assert str(error.value) == f"difficulty state: {path}: 'cloze': {message}"
