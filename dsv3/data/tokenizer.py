"""Byte-level BPE trained on the corpus (HF ``tokenizers``) and the tokenized corpus on disk.

Byte-level so that any text (code, Chinese, emoji) tokenizes without unknown tokens;
trained on the prepared corpus itself so its vocabulary fits what the model will read.
Each document is encoded once and stored per domain as one flat ``uint32`` token array
plus document offsets (``.npy``, memory-mapped when read), which is all the mixture
sampler and the packer need: a document is a slice, and its length is a subtraction.
An end-of-text token closes every document, so packed sequences mark where one ends.
When ``dsv3 data prepare`` held documents out (dsv3.data.heldout), they are each
domain's last ones, and ``heldout`` says how many (the manifest's ``"heldout"``).
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Iterable, Mapping

import numpy as np

from dsv3.validate import number

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2):
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``EOS`` as its one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if vocab_size < 256 + 1:
        raise ValueError(f"vocab_size must be > 256 (the byte alphabet) , got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | os.PathLike):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(os.fspath(path))


@contextmanager
def specials_as_text(tokenizer):
    """Encode special-token strings found in text as the plain text they are: a document
    that quotes "<|endoftext|>" must not gain an end of text where it does not end.
    The caller's tokenizer gets its own setting back afterwards."""
    saved = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        yield tokenizer
    finally:
        tokenizer.encode_special_tokens = saved


class TokenizedCorpus:
    """Per-domain ``tokens`` (uint32) and ``offsets`` (int64, n_docs + 1) arrays, and
    ``heldout``: None, or the prepared held-out split, ``{"fraction", "seed",
    "documents": {domain: how many of its last documents are held out}}``."""

    def __init__(self, tokens: Mapping[str, np.ndarray], offsets: Mapping[str, np.ndarray],
                 eos_id: int, vocab_size: int, heldout: dict | None = None) -> None:
        if set(tokens) != set(offsets):
            raise ValueError(f"tokens and offsets name different domains: "
                             f"{sorted(tokens)} vs {sorted(offsets)}")
        self.tokens, self.offsets = dict(tokens), dict(offsets)
        self.eos_id, self.vocab_size = eos_id, vocab_size
        if heldout is not None:
            _check_heldout(heldout, {d: len(o) - 1 for d, o in self.offsets.items()})
        self.heldout = heldout

    @property
    def domains(self) -> list[str]:
        return list(self.tokens)

    def training_part(self) -> "TokenizedCorpus":
        """The corpus without its held-out documents (itself when none are): what a
        loader may train on."""
        return self if self.heldout is None else self.without_last(self.heldout["documents"])

    def without_last(self, n_docs: Mapping[str, int]) -> "TokenizedCorpus":
        """The corpus without each domain's last ``n_docs[domain]`` documents (views of
        the same arrays, no copy)."""
        tokens, offsets = {}, {}
        for d, o in self.offsets.items():
            n_kept = len(o) - 1 - n_docs[d]
            offsets[d] = o[:n_kept + 1]
            tokens[d] = self.tokens[d][:int(o[n_kept])]
        return TokenizedCorpus(tokens, offsets, self.eos_id, self.vocab_size)

    @classmethod
    def encode(cls, docs_by_domain: Mapping[str, Iterable[str]], tokenizer,
               batch_size: int = 256) -> "TokenizedCorpus":
        eos_id = tokenizer.token_to_id(EOS)
        if eos_id is None:
            raise ValueError(f"tokenizer: has no {EOS!r} token (train it with train_tokenizer)")
        tokens, offsets = {}, {}
        with specials_as_text(tokenizer):
            for domain, texts in docs_by_domain.items():
                pieces, lengths, batch = [], [], []

                def flush():
                    for enc in tokenizer.encode_batch(batch, add_special_tokens=False):
                        ids = enc.ids + [eos_id]  # the only EOS a document gets
                        pieces.append(np.asarray(ids, dtype=np.uint32))
                        lengths.append(len(ids))
                    batch.clear()

                for text in texts:
                    batch.append(text)
                    if len(batch) == batch_size:
                        flush()
                flush()
                if not pieces:
                    raise ValueError(f"docs_by_domain[{domain!r}]: no documents")
                tokens[domain] = np.concatenate(pieces)
                offsets[domain] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(tokens, offsets, eos_id, tokenizer.get_vocab_size())

    def save(self, directory: str | os.PathLike) -> dict:
        os.makedirs(directory, exist_ok=True)
        manifest = {"eos_id": self.eos_id, "vocab_size": self.vocab_size, "domains": {}}
        for d in self.domains:
            np.save(os.path.join(directory, f"{d}.tokens.npy"), self.tokens[d])
            np.save(os.path.join(directory, f"{d}.offsets.npy"), self.offsets[d])
            manifest["domains"][d] = {"documents": len(self.offsets[d]) - 1,
                                      "tokens": int(self.offsets[d][-1])}
        if self.heldout is not None:
            manifest["heldout"] = self.heldout
        with open(os.path.join(directory, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
        return manifest

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TokenizedCorpus":
        path = os.path.join(directory, "manifest.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"directory: no manifest.json in {os.fspath(directory)!r} "
                                    f"(write it with `dsv3 data prepare`)")
        with open(path) as f:
            manifest = json.load(f)
        tokens = {d: np.load(os.path.join(directory, f"{d}.tokens.npy"), mmap_mode="r")
                  for d in manifest["domains"]}
        offsets = {d: np.load(os.path.join(directory, f"{d}.offsets.npy"))
                   for d in manifest["domains"]}
        try:
            return cls(tokens, offsets, manifest["eos_id"], manifest["vocab_size"],
                       manifest.get("heldout"))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _check_heldout(heldout: dict, documents: dict[str, int]) -> None:
    """A held-out split names every domain, and leaves each at least one document to
    train on."""
    counts = heldout.get("documents") if isinstance(heldout, dict) else None
    if not isinstance(counts, dict) or set(counts) != set(documents):
        raise ValueError(f"heldout: expected held-out document counts for the domains "
                         f"{sorted(documents)}, got {heldout!r}")
    number("heldout.fraction", heldout.get("fraction"), 0, 1, high_open=True)
    for domain, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < documents[domain]:
            raise ValueError(f"heldout: domain {domain!r} has {documents[domain]} document(s), "
                             f"so 0 to {documents[domain] - 1} can be held out, got {n!r}")
