"""Augmentation: restructuring rules (en, zh), synonym swaps from a lexicon, seeded
sentence choice, flags and the realized rate; the learned lexicon on a planted corpus."""
import json
import random
import time

import pytest

from dsv3.cli import main
from dsv3.data.augment import Augmenter, Lexicon, restructure
from dsv3.data.document import Document


@pytest.mark.parametrize("sentence, expected", [
    ("Because the list is empty, the loop never runs.", "The loop never runs because the list is empty."),
    ("The loop never runs because the list is empty.", "Because the list is empty, the loop never runs."),
    ("If Python finds it, it is used.", "It is used if Python finds it."),  # a name keeps its capital
    ("因为下雨了，所以比赛推迟了。", "之所以比赛推迟了，是因为下雨了。"),
    ("虽然价格很高，但是质量很好。", "尽管价格很高，质量很好。"),
    ("Nothing to restructure here.", None),
    # still fire: a two-word clause with a pronoun subject, "!", a reason after a negation
    ("Because it rains, we stay.", "We stay because it rains."),
    ("If you like, we can go.", "We can go if you like."),
    ("If the list is empty, then the loop never runs.", "The loop never runs if the list is empty."),
    ("The build failed because the linker ran out of memory!",
     "Because the linker ran out of memory, the build failed!"),
])
def test_restructuring_rules(sentence, expected):
    assert restructure(sentence) == expected


@pytest.mark.parametrize("sentence", [
    "Since 2010, prices have risen.",  # "since" as often means time: not "because 2010"
    "Since then, the module has been deprecated.",
    "If so, why?",  # a question, and a one-word condition: not "Why if so?"
    "If so, the module is deprecated.",
    "If nothing else, it is cheap.",  # an idiom: "if nothing else" is not a condition
    "This is not because of you.",  # not "Because of you, this is not."
    "It is not because the list is empty that the loop never runs.",
    "It works only because the cache is warm.",  # the reason narrowed, not the claim
    "Because of this, the loop never runs.",  # a fragment, not a clause
    "Because the list is empty, does the loop run?",
    "因为下雨了，所以比赛推迟了吗？",  # 吗 would land mid-sentence
])
def test_restructuring_leaves_what_moving_would_change(sentence):
    """Before: each of these was rewritten into a sentence that said something else."""
    assert restructure(sentence) is None


def test_a_long_sentence_is_not_restructured_and_costs_little():
    """Before: the "X because Y" rule was quadratic on a comma-free run without an end
    mark (about 10 s for this 100 KB; 19 s at 136 KB)."""
    text = "it broke because " * 6000
    start = time.perf_counter()
    assert restructure(text) is None
    doc = Augmenter(Lexicon({}), rate=1.0).apply(Document("long", text))
    assert time.perf_counter() - start < 1.0
    assert doc.text == text and not doc.metadata["augmented"]


def _doc(i, n=40):
    rng = random.Random(i)
    sentences = [rng.choice(["The big house stood on the hill.", "A quick answer came back.",
                             "We saw a big dog near the river.", "这是一个很大的房子。"])
                 for _ in range(n)]
    return Document(f"d{i}", " ".join(sentences))


def test_rate_flags_and_determinism():
    lexicon = Lexicon({"big": ["large"], "quick": ["fast"], "很大": ["巨大"]})
    step = Augmenter(lexicon, rate=0.15, seed=0)
    docs = [step.apply(_doc(i)) for i in range(50)]
    sentences = step.stats.counts["sentences"]
    assert sentences == 50 * 40
    # every sentence of this corpus has a swappable word, so realized == chosen
    assert step.realized_rate == step.stats.counts["sentences_chosen"] / sentences
    assert abs(step.realized_rate - 0.15) < 0.02
    assert all(d.metadata["augmented"] == ("augmented_sentences" in d.metadata) for d in docs)
    joined = " ".join(d.text for d in docs)
    assert "large" in joined and "fast" in joined and "巨大" in joined
    again = Augmenter(lexicon, rate=0.15, seed=0)
    assert [again.apply(_doc(i)).text for i in range(50)] == [d.text for d in docs]
    other = Augmenter(lexicon, rate=0.15, seed=1)
    assert [other.apply(_doc(i)).text for i in range(50)] != [d.text for d in docs]


def test_without_a_matching_word_or_rule_a_chosen_sentence_is_left_alone():
    step = Augmenter(Lexicon({}), rate=1.0)
    doc = step.apply(Document("x", "Plain words only. Because it rains, we stay."))
    assert doc.text == "Plain words only. We stay because it rains."
    assert step.stats.counts["sentences_chosen"] == 2 and step.realized_rate == 0.5


def test_learned_lexicon_finds_planted_synonyms_and_skips_prefix_antonyms():
    rng = random.Random(0)
    nouns = ["house", "garden", "river", "village", "market", "bridge", "tower", "forest"]
    texts = []
    for _ in range(400):
        adj = rng.choice(["large", "huge"])
        neg = rng.choice(["locked", "unlocked"])
        texts.append(f"the {adj} {rng.choice(nouns)} was {neg} near the {rng.choice(nouns)}")
    lex = Lexicon.learn(texts, min_count=5, min_cosine=0.5)
    assert "huge" in lex.synonyms.get("large", [])
    assert "unlocked" not in lex.synonyms.get("locked", [])


def test_argument_and_lexicon_errors(tmp_path):
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\], got 1.5"):
        Augmenter(rate=1.5)
    with pytest.raises(ValueError, match=r"rate must be a number, got '0.2'"):
        Augmenter(rate="0.2")  # compared with floats mid-run: a TypeError naming nothing
    with pytest.raises(ValueError, match=r"seed must be a whole number, got 1.5"):
        Augmenter(seed=1.5)
    with pytest.raises(TypeError, match="lexicon must be a Lexicon, got dict"):
        Augmenter({"a": ["b"]})
    bad = tmp_path / "lex.tsv"
    bad.write_text("big large\n")
    with pytest.raises(ValueError, match=r"lex.tsv, line 1: expected 'word<TAB>syn1,syn2'"):
        Lexicon.from_tsv(str(bad))
    bad.write_text("big\tlarge, huge\n")
    assert Lexicon.from_tsv(str(bad)).synonyms == {"big": ["large", "huge"]}


def test_prepare_reports_realized_rate(tmp_path, capsys):
    lex = tmp_path / "lex.tsv"
    lex.write_text("function\troutine\nvalue\tquantity\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[[sources]]
kind = "embedded"
domains = ["reference"]
max_docs_per_domain = 10
[steps]
order = ["augment"]
[steps.augment]
lexicon = "{lex}"
[tokenizer]
vocab_size = 300
""")
    assert main(["data", "prepare", "--config", str(cfg), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    capsys.readouterr()
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    realized = stats["augmentation"]["augment"]["realized_rate"]
    assert 0.0 < realized <= 0.15
    kept = [json.loads(x) for x in (tmp_path / "o" / "kept" / "reference.jsonl").read_text().splitlines()]
    assert any(d["metadata"]["augmented"] for d in kept)
