"""The held-out documents stay unseen by every stage: `final/heldout.jsonl` is what
`dsv3 eval` scores the model on, so the DPO stage's preference pairs must come from
the training split (they were once drawn from the held-out text)."""
import numpy as np

import dsv3.train.trainer as trainer_module
from dsv3.data.tokenizer import TokenizedCorpus
from dsv3.train.data import TrainData
from dsv3.train.trainer import Trainer
from train_support import VOCAB, three_stage_config

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
