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


def _edit_config(directory, edit):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("max_seq_len"), " lacks the field(s) ['max_seq_len']"),
    (lambda c: [c.pop("rope_theta"), c.pop("moe")], " lacks the field(s) ['moe', 'rope_theta']"),
    (lambda c: c["moe"].pop("n_experts"), ": moe lacks the field(s) ['n_experts']"),
    (lambda c: c["moe"].update(experts=4), ": moe has keys MoEConfig does not know: ['experts']"),
    (lambda c: c.update(dim="32"), ": ModelConfig: dim must be a whole number, got '32'"),
])
def test_a_config_lacking_a_field_is_refused(tmp_path, edit, message):
    """A missing max_seq_len was the default 512 for a model trained at 32, silently;
    a bad value was named without its file."""
    save_checkpoint(tmp_path, tiny_model(), train_tokenizer())
    _edit_config(tmp_path, edit)
    with pytest.raises(ValueError) as error:
        load_checkpoint(str(tmp_path))
    assert str(error.value) == f"checkpoint: {tmp_path / 'config.json'}{message}"


def test_a_config_from_before_the_later_moe_fields_loads(tmp_path):
    """swiglu_limit and group_score came after the first checkpoints: their defaults
    are what those checkpoints were trained with."""
    save_checkpoint(tmp_path, tiny_model(), train_tokenizer())
    _edit_config(tmp_path, lambda c: [c["moe"].pop("swiglu_limit"), c["moe"].pop("group_score")])
    model, _ = load_checkpoint(str(tmp_path))
    assert model.config.moe.swiglu_limit is None and model.config.moe.group_score == "top2_sum"
