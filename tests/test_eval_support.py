"""Shared pieces of the dsv3.eval tests (imported by the test_eval_* files): a tiny
byte-level BPE, a tiny Transformer, the trainer's checkpoint layout, and two fake
models with the Transformer's interface (tokens -> logits): one with all-equal logits
and one that knows the right continuations."""
import dataclasses
import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv3.eval.loading import TextCodec
from dsv3.model import ModelConfig, Transformer
from dsv3.moe import MoEConfig

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "def add(a, b): return a + b",
         "import os\nprint(os.getcwd())", "The quick brown fox jumps over the lazy dog."] * 4


def train_tokenizer(vocab_size: int = 300) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXTS, trainer)
    return tokenizer


def tiny_config(vocab_size: int = 300, max_seq_len: int = 32) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       max_seq_len=max_seq_len, n_dense_layers=1, dense_ffn_dim=64,
                       moe=MoEConfig(dim=32, ffn_dim=32, n_experts=4, top_k=2))


def tiny_model(**overrides) -> Transformer:
    return Transformer(dataclasses.replace(tiny_config(), **overrides)).eval()


def codec() -> TextCodec:
    return TextCodec(train_tokenizer())


def save_checkpoint(directory, model: Transformer, tokenizer: Tokenizer) -> None:
    """The trainer's layout: config.json, model.pt, tokenizer.json."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(model.config), f)
    torch.save(model.state_dict(), os.path.join(directory, "model.pt"))
    tokenizer.save(os.path.join(directory, "tokenizer.json"))


class UniformModel:
    """All-equal logits: every token has probability 1/vocab at every position."""

    def __init__(self, vocab_size: int, max_seq_len: int = 64):
        self.config = ModelConfig(vocab_size=vocab_size, dim=8, n_layers=1, n_heads=2,
                                  max_seq_len=max_seq_len)

    def __call__(self, tokens_BS, kv_cache=None):
        if kv_cache is not None:
            kv_cache.advance(tokens_BS.shape[1])
        return torch.zeros(*tokens_BS.shape, self.config.vocab_size)


class OracleModel(UniformModel):
    """Knows the right continuations: after any prefix of a known correct sequence it
    puts logit 20 on that sequence's next token (probability ~1), elsewhere uniform."""

    def __init__(self, vocab_size: int, correct_sequences: list[list[int]], max_seq_len: int = 64):
        super().__init__(vocab_size, max_seq_len)
        self.next_token = {}
        for seq in correct_sequences:
            for t in range(1, len(seq)):
                self.next_token[tuple(seq[:t])] = seq[t]

    def __call__(self, tokens_BS, kv_cache=None):
        new = tokens_BS.shape[1]
        if kv_cache is not None:  # decoding: the prefix lives in the cache, keep it there
            seen = getattr(kv_cache, "oracle_seen", tokens_BS[:, :0])
            kv_cache.oracle_seen = tokens_BS = torch.cat([seen, tokens_BS], 1)
        logits_BSV = super().__call__(tokens_BS, kv_cache)
        for b, row in enumerate(tokens_BS.tolist()):
            for t in range(len(row)):
                token = self.next_token.get(tuple(row[:t + 1]))
                if token is not None:
                    logits_BSV[b, t, token] = 20.0
        return logits_BSV[:, -new:]


def write_jsonl(path, rows) -> str:
    """``rows`` as a jsonl file at ``path``; returns the path as a str."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
