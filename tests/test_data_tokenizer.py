"""Byte-level BPE trained on the embedded corpus; the tokenized corpus on disk."""
import numpy as np
import pytest

from dsv3.data.corpus import embedded_corpus
from dsv3.data.tokenizer import EOS, TokenizedCorpus, load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    texts = [d.text for d in embedded_corpus(["reference"], max_docs_per_domain=20)]
    return train_tokenizer(texts, vocab_size=600)


def test_trained_bpe_round_trips_any_text(tokenizer):
    assert tokenizer.get_vocab_size() == 600
    for text in ["The for statement iterates over a sequence.", "中文文本，也能编码。", "emoji 🙂\ttab"]:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids) == text
    # merges learned from the corpus: common English compresses below one token per byte
    text = "The import statement is used to import a module."
    assert len(tokenizer.encode(text).ids) < 0.6 * len(text.encode())


def test_tokenized_corpus_appends_eos_and_round_trips_on_disk(tokenizer, tmp_path):
    corpus = TokenizedCorpus.encode({"a": ["first doc", "second"], "b": ["third one here"]},
                                    tokenizer)
    eos = tokenizer.token_to_id(EOS)
    for d in ("a", "b"):
        ends = corpus.offsets[d][1:] - 1
        assert (corpus.tokens[d][ends] == eos).all()
        assert (corpus.tokens[d] == eos).sum() == len(ends)
    start, end = corpus.offsets["a"][1], corpus.offsets["a"][2]
    assert tokenizer.decode(corpus.tokens["a"][start:end - 1].tolist()) == "second"
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    manifest = corpus.save(tmp_path / "tokens")
    assert manifest["domains"]["a"]["documents"] == 2
    loaded = TokenizedCorpus.load(tmp_path / "tokens")
    assert loaded.domains == ["a", "b"] and loaded.eos_id == eos
    assert all(np.array_equal(loaded.tokens[d], corpus.tokens[d]) for d in ("a", "b"))
    assert load_tokenizer(tmp_path / "tokenizer.json").encode("second").ids == \
        tokenizer.encode("second").ids


def test_special_token_text_in_a_document_stays_text(tokenizer):
    texts = [f"a doc that quotes {EOS} in prose", EOS, f"{EOS}{EOS}x", "plain"]
    corpus = TokenizedCorpus.encode({"a": texts}, tokenizer)
    eos = tokenizer.token_to_id(EOS)
    tokens, offsets = corpus.tokens["a"], corpus.offsets["a"]
    assert (tokens == eos).sum() == len(texts)  # one per document, at its end only
    for text, start, end in zip(texts, offsets[:-1], offsets[1:]):
        assert tokens[end - 1] == eos
        assert tokenizer.decode(tokens[start:end - 1].tolist(), skip_special_tokens=False) == text
    assert tokenizer.encode_special_tokens is False  # the caller's setting is back


def test_errors(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be > 256"):
        train_tokenizer(["x"], vocab_size=100)
    with pytest.raises(ValueError, match=r"docs_by_domain\['a'\]: no documents"):
        TokenizedCorpus.encode({"a": []}, tokenizer)
    with pytest.raises(FileNotFoundError, match="directory: no manifest.json"):
        TokenizedCorpus.load(tmp_path)
