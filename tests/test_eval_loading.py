"""dsv3.eval loading: the trainer's checkpoint layout round-trips (same logits, eos
found), and a missing file, an unknown config key or weights that do not fit the
config fail with the culprit named; a checkpoint trained with an expert capacity is
evaluated dropless."""
import json
import os

import pytest
import torch

from dsv3.eval.loading import load_checkpoint
from test_eval_support import save_checkpoint, tiny_model, train_tokenizer


def test_checkpoint_round_trip(tmp_path):
    model, tokenizer = tiny_model(), train_tokenizer()
    save_checkpoint(tmp_path, model, tokenizer)
    loaded, text_codec = load_checkpoint(str(tmp_path))
    tokens = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)
    assert not loaded.training
    assert text_codec.eos_id == tokenizer.token_to_id("<|endoftext|>")
    assert text_codec.decode(text_codec.encode("def add(a, b)")) == "def add(a, b)"


def test_missing_file_is_named(tmp_path):
    save_checkpoint(tmp_path, tiny_model(), train_tokenizer())
    os.remove(tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="lacks tokenizer.json"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nowhere"))


def test_bad_config_and_mismatched_weights(tmp_path):
    save_checkpoint(tmp_path, tiny_model(), train_tokenizer())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_experts": 3}))
    with pytest.raises(ValueError, match=r"keys ModelConfig does not know: \['n_experts'\]"):
        load_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "dim": 64, "moe": None}))
    with pytest.raises(ValueError, match="model.pt does not fit config.json"):
        load_checkpoint(str(tmp_path))


def test_codec_encodes_a_quoted_end_of_text_as_text():
    """Training encoded documents with special-token strings as plain text: the
    evaluation must encode a quoted "<|endoftext|>" the same way, not as the end."""
    from dsv3.eval.loading import TextCodec
    tokenizer = train_tokenizer()
    eos_id = tokenizer.token_to_id("<|endoftext|>")
    codec = TextCodec(tokenizer)
    ids = codec.encode("a quoted <|endoftext|> marker")
    assert eos_id not in ids
    assert codec.decode(ids) == "a quoted <|endoftext|> marker"


def test_a_checkpoint_trained_with_a_capacity_is_evaluated_dropless(tmp_path):
    """With capacity_factor set, the other sequences and the padding of a batch compete
    for expert slots: perplexity depended on --batch-size. Loaded dropless, it does not."""
    import dataclasses

    from dsv3.eval.perplexity import domain_perplexity
    from dsv3.model import Transformer
    from test_eval_support import tiny_config
    config = tiny_config()
    config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, capacity_factor=0.5))
    torch.manual_seed(0)
    save_checkpoint(tmp_path, Transformer(config).eval(), train_tokenizer())
    model, text_codec = load_checkpoint(str(tmp_path))
    assert model.config.moe.capacity_factor is None
    documents = [("a", "the cat sat on the mat " * 3), ("b", "def add(a, b): return a + b"),
                 ("a", "a dog ran in the park and the quick brown fox jumps " * 2)]
    one, eight = (domain_perplexity(model, text_codec, documents, batch_size=b)["all"]
                  for b in (1, 8))
    assert one["perplexity"] == pytest.approx(eight["perplexity"], rel=1e-5)
