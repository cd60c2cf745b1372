"""A small synthetic tokenized corpus and training config for the trainer tests:
two domains of a learnable toy language (next = (m * token + 3) mod V, 10% noise),
so a few dozen steps visibly lower the loss."""
import dataclasses
import json

import numpy as np

from dsv3.data.tokenizer import TokenizedCorpus
from dsv3.train.config import OptimConfig, StageConfig, TrainConfig
from dsv3.train.data import TrainData

VOCAB = 64


def synthetic_corpus(docs: int = 30, doc_len: int = 160, seed: int = 0) -> TokenizedCorpus:
    rng = np.random.default_rng(seed)
    tokens, offsets = {}, {}
    for domain, mult in (("alpha", 5), ("beta", 7)):
        pieces = []
        for _ in range(docs):
            doc = [int(rng.integers(1, VOCAB))]
            for _ in range(doc_len - 2):
                noisy = rng.random() < 0.1
                doc.append(int(rng.integers(1, VOCAB)) if noisy else (mult * doc[-1] + 3) % (VOCAB - 1) + 1)
            pieces.append(np.array(doc + [0], dtype=np.uint32))  # 0 = end of text
        tokens[domain] = np.concatenate(pieces)
        offsets[domain] = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
    return TokenizedCorpus(tokens, offsets, eos_id=0, vocab_size=VOCAB)


def synthetic_data() -> TrainData:
    return TrainData.from_corpus(synthetic_corpus(), val_fraction=0.1)


def three_stage_config(out_dir, **overrides) -> TrainConfig:
    config = TrainConfig(
        out_dir=str(out_dir), steps=20, micro_batch=4, log_every=5,
        # a one-step warm-up: the default 20 would outlast these runs of a few steps
        optim=OptimConfig(warmup_steps=1),
        # no vocab_size: the trainer takes the data's (VOCAB), as from a real tokenizer
        model_overrides=dict(dim=32, n_layers=2, n_heads=2, max_seq_len=64, dense_ffn_dim=64,
                             moe=dict(dim=32, ffn_dim=32, n_experts=4, top_k=2,
                                      bias_update_rate=1e-3)),
        stages=[StageConfig("base", "lm", 0.4, seq_len=24),
                StageConfig("domain", "curriculum", 0.3, seq_len=32, seq_len_start=16,
                            mixture_start={"alpha": 0.8, "beta": 0.2},
                            mixture_end={"alpha": 0.2, "beta": 0.8}),
                StageConfig("preference", "dpo", 0.3, seq_len=16, lr_scale=0.3)])
    return dataclasses.replace(config, **overrides)


def command_run(tmp_path, **overrides) -> list[str]:
    """`dsv3 train` arguments for the tiny three-stage run on the synthetic corpus, its
    data prepared in ``tmp_path/data`` (tokens and mixture.json, no tokenizer) and its
    out_dir ``tmp_path/out``."""
    data = tmp_path / "data"
    synthetic_corpus().save(data / "tokens")
    (data / "mixture.json").write_text(json.dumps({"weights": {"alpha": 0.5, "beta": 0.5}}))
    config = tmp_path / "run.yaml"  # JSON is YAML
    config.write_text(json.dumps(three_stage_config(tmp_path / "out", **overrides).to_dict()))
    return ["train", "--config", str(config), "--data", str(data), "--no-progress"]


def saved_partway(tmp_path, steps: int = 3) -> list[str]:
    """``command_run``'s arguments, for a run saved after ``steps`` steps on the data
    that command trains on (a resume must be on the same data)."""
    from dsv3.train.data import TrainData
    from dsv3.train.trainer import Trainer
    command = command_run(tmp_path)
    trainer = Trainer(three_stage_config(tmp_path / "out"), TrainData.load(tmp_path / "data"))
    for _ in range(steps):
        trainer.train_step()
    trainer.save()
    return command


def word_tokenizer(path):
    """A real tokenizer file for the synthetic vocabulary (token i decodes to "ti"), so
    that a run exports its held-out documents (final/heldout.jsonl); returns ``path``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    path.parent.mkdir(parents=True, exist_ok=True)
    Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1")).save(str(path))
    return path
