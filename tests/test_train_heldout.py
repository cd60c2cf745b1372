"""The held-out documents stay unseen by every stage: `final/heldout.jsonl` is what
`dsv3 eval` scores the model on, so the DPO stage's preference pairs must come from
the training split (they were once drawn from the held-out text). The file is
written whole or not at all, and a finished run without it (or another exported
file) exports again."""
import numpy as np
import pytest

import dsv3.train.trainer as trainer_module
from dsv3.cli import main
from dsv3.data.tokenizer import TokenizedCorpus
from dsv3.train import checkpoint as ckpt
from dsv3.train.config import StageConfig
from dsv3.train.data import TrainData
from dsv3.train.trainer import Trainer
from train_support import (VOCAB, command_run, synthetic_data, three_stage_config,
                           word_tokenizer)

HELD_OUT_TOKENS = range(40, VOCAB)  # only the held-out document uses these


def corpus_with_marked_held_out_docs(docs: int = 10, doc_len: int = 160) -> TokenizedCorpus:
    """Per domain, ``docs`` documents; the last one (held out at val_fraction=0.1)
    is written in tokens no training document has."""
    rng = np.random.default_rng(0)
    tokens, offsets = {}, {}
    for domain in ("alpha", "beta"):
        pieces = [rng.integers(1, HELD_OUT_TOKENS.start, doc_len - 1) for _ in range(docs - 1)]
        pieces.append(rng.integers(HELD_OUT_TOKENS.start, VOCAB, doc_len - 1))
        pieces = [np.append(p, 0).astype(np.uint32) for p in pieces]  # 0 = end of text
        tokens[domain] = np.concatenate(pieces)
        offsets[domain] = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
    return TokenizedCorpus(tokens, offsets, eos_id=0, vocab_size=VOCAB)


def test_dpo_pairs_come_from_the_training_split(tmp_path, monkeypatch):
    data = TrainData.from_corpus(corpus_with_marked_held_out_docs(), val_fraction=0.1)
    assert all(set(stream.tolist()) - {0} <= set(HELD_OUT_TOKENS) for stream in data.val.values())
    drawn = []

    def recording_preference_batch(*args, **kwargs):
        batch = real_preference_batch(*args, **kwargs)
        drawn.append(batch)
        return batch

    real_preference_batch = trainer_module.preference_batch
    monkeypatch.setattr(trainer_module, "preference_batch", recording_preference_batch)
    Trainer(three_stage_config(tmp_path, steps=10), data).train(progress=False)
    assert drawn, "the DPO stage drew no pairs"
    for prompt_BP, chosen_BR, rejected_BR in drawn:
        for part in (prompt_BP, chosen_BR, rejected_BR):
            assert not any(int(t) in HELD_OUT_TOKENS for t in part.flatten()), \
                "a preference pair holds held-out text"


class InterruptedRead:
    """A held-out stream whose reading is cut short, as by a Ctrl-C."""

    def tolist(self):
        raise KeyboardInterrupt


def test_an_export_cut_short_keeps_the_old_held_out_file_whole(tmp_path):
    """Before: heldout.jsonl was written in place, line by line: cut short, it held
    the first domain's documents alone."""
    data = synthetic_data()
    tokenizer = word_tokenizer(tmp_path / "tokenizer.json")
    path = tmp_path / "heldout.jsonl"
    path.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        ckpt.export_heldout(path, {"alpha": data.val["alpha"], "beta": InterruptedRead()},
                            tokenizer, 0)
    assert path.read_text() == "old\n"


def test_a_finished_run_missing_an_exported_file_exports_again(tmp_path, capsys):
    """Before: `dsv3 train` found final/model.pt and summary.json and did nothing, so
    a missing (or, cut short, partial) final/heldout.jsonl stayed missing."""
    command = command_run(tmp_path, steps=4, stages=[StageConfig("base", seq_len=24)])
    word_tokenizer(tmp_path / "data" / "tokenizer.json")
    assert main(command) == 0
    final = tmp_path / "out" / "final"
    exported = {path.name: path.read_bytes() for path in final.iterdir()}
    assert sorted(exported) == ["config.json", "heldout.jsonl", "model.pt", "tokenizer.json"]
    for name in ("heldout.jsonl", "config.json"):
        (final / name).unlink()
        assert main(command) == 0
        assert {path.name: path.read_bytes() for path in final.iterdir()} == exported, name
