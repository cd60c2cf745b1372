"""Exact and MinHash near-duplicate removal keep the first copy and count the rest."""
import random

import pytest

from dsv3.data.dedup import ExactDedup, MinHashDedup
from dsv3.data.document import Document


def _text(rng, n=200):
    vocab = [f"w{i}" for i in range(2000)]
    return " ".join(rng.choice(vocab) for _ in range(n))


def test_exact_dedup_ignores_case_and_spacing():
    docs = [Document("a", "Hello  World\n"), Document("b", "hello world"),
            Document("c", "hello, world"), Document("d", "ＨＥＬＬＯ world")]
    step = ExactDedup()
    assert [d.id for d in step(docs)] == ["a", "c"]
    assert step.stats.dropped == {"exact_duplicate": 2}


def test_minhash_drops_near_copies_and_keeps_distinct_documents():
    rng = random.Random(0)
    originals = [_text(rng) for _ in range(30)]
    docs = [Document(f"o{i}", t) for i, t in enumerate(originals)]
    # near copies: 2 of 200 words changed (Jaccard of 5-gram shingles ~0.9)
    for i, t in enumerate(originals[:10]):
        words = t.split()
        words[50], words[150] = "changed", "again"
        docs.append(Document(f"near{i}", " ".join(words)))
    # far copies: half the words changed (Jaccard ~0): must be kept
    for i, t in enumerate(originals[10:20]):
        words = t.split()
        words[::2] = [f"x{j}" for j in range(len(words[::2]))]
        docs.append(Document(f"far{i}", " ".join(words)))
    step = MinHashDedup(threshold=0.7)
    kept = [d.id for d in step(docs)]
    assert kept == [f"o{i}" for i in range(30)] + [f"far{i}" for i in range(10)]
    assert step.stats.dropped == {"near_duplicate": 10}


def test_minhash_on_chinese_uses_characters():
    base = "我们在春天的早晨走进山谷看见农民在田里种植小麦和水稻孩子们沿着小路去学校老师准备好了新的课本" * 2
    docs = [Document("a", base), Document("b", base[:-2] + "教材"), Document("c", base[::-1])]
    assert [d.id for d in MinHashDedup(threshold=0.7)(docs)] == ["a", "c"]


def test_minhash_texts_without_words_are_compared_by_characters():
    texts = ["😀😀😀 🎉", "∑∫∂ ≤ ≥ ≠ → ⇒", "-----", "!!!", "???", "", "  \n",
             "😀😀😀🎉", "----- "]
    step = MinHashDedup()
    kept = [d.text for d in step(Document(str(i), t) for i, t in enumerate(texts))]
    # distinct symbol texts all stay; only the respaced copies are near-duplicates, and
    # blank texts are not matched on an empty signature (counted instead)
    assert kept == texts[:7]
    assert step.stats.dropped == {"near_duplicate": 2}
    assert step.stats.counts == {"blank_not_compared": 2}


def test_minhash_matches_decomposed_and_composed_copies():
    import unicodedata
    text = ("Le café était très animé ce matin-là, les élèves répétaient leur leçon préférée "
            "près de la fenêtre, et le garçon à côté rêvait déjà des vacances d'été.")
    docs = [Document("nfc", text), Document("nfd", unicodedata.normalize("NFD", text))]
    assert [d.id for d in MinHashDedup()(docs)] == ["nfc"]


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": 1.0}, r"threshold must be in \(0, 1\), got 1.0"),
    ({"ngram": 0}, "ngram must be >= 1, got 0"),
    ({"num_perm": 8}, "num_perm must be >= 16, got 8"),
])
def test_minhash_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MinHashDedup(**kwargs)


def test_minhash_drops_by_the_threshold_not_by_a_bucket_hit():
    """An LSH bucket hit was taken as the decision: at threshold 0.8 it kept about half
    the pairs of Jaccard 0.8-0.85 and dropped a third of those at 0.75-0.8. Now a
    candidate's estimated Jaccard decides (its spread, about 0.035, is what remains)."""
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(20000)]
    step = MinHashDedup(threshold=0.8)
    dropped_by_band = {}
    for i in range(300):
        words = [rng.choice(vocab) for _ in range(400)]
        variant = list(words)
        for j in rng.sample(range(400), rng.randint(1, 12)):
            variant[j] = rng.choice(vocab)
        a = Document(f"a{i}", " ".join(words), "web", {})
        b = Document(f"b{i}", " ".join(variant), "web", {})
        first, second = step.shingles(a), step.shingles(b)
        jaccard = len(first & second) / len(first | second)
        band = next(low for low in (0.85, 0.8, 0.75, 0.0) if jaccard >= low)
        dropped_by_band.setdefault(band, []).append(len(list(step([a, b]))) == 1)
    share = {band: sum(d) / len(d) for band, d in dropped_by_band.items()}
    assert share[0.85] == 1.0 and share[0.8] >= 0.7, share
    assert share[0.75] <= 0.35 and share.get(0.0, 0.0) <= 0.15, share
