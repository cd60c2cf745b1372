"""Packed fixed-length training batches from the mixture stream, as a stateful loader.

The mixture sampler's units are concatenated into one token stream and cut into rows
of ``seq_len + 1`` tokens (input = row[:-1], target = row[1:]); a document may span
rows, and the end-of-text token marks its end. Each row also carries the domain id of
every token, so per-domain losses and the realized mixture can be measured.

Worker-count independence: batch ``b`` is built by worker ``b % num_workers``, which
is exactly the order in which ``torch.utils.data.DataLoader`` collects from its
workers, and every worker walks the same deterministic unit stream (copying tokens
only for its own batches). Any ``num_workers`` therefore yields the same batches.

Resumability: :class:`PackedLoader` counts the batches it has handed out; its
``state_dict`` is that count plus the settings that shape the stream, and after
``load_state_dict`` the workers fast-forward the stream by lengths alone.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dsv3.data.mixture import MixtureSampler, MixtureSchedule
from dsv3.data.tokenizer import TokenizedCorpus


class PackedBatches(IterableDataset):
    """Infinite stream of ``{"input_ids": int64 [B, L+1], "domain_ids": int64 [B, L+1]}``
    starting at batch ``start_batch``."""

    def __init__(self, corpus: TokenizedCorpus, schedule: MixtureSchedule, seq_len: int,
                 batch_size: int, seed: int = 0, max_chunk_tokens: int = 1024,
                 start_batch: int = 0) -> None:
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.corpus, self.schedule = corpus, schedule
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.max_chunk_tokens, self.start_batch = max_chunk_tokens, start_batch
        self.tokens = [corpus.tokens[d] for d in schedule.domains]
        # validate the domains now, not in a worker
        MixtureSampler(schedule, corpus.offsets, seed, max_chunk_tokens)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        sampler = MixtureSampler(self.schedule, self.corpus.offsets, self.seed,
                                 self.max_chunk_tokens)
        row = self.seq_len + 1
        per_batch = self.batch_size * row
        # (unit, tokens of it already used) of a unit cut by a batch boundary
        pending = self._skip(sampler, self.start_batch * per_batch)
        b = self.start_batch
        while True:
            mine = (b - self.start_batch) % n_workers == worker
            ids = np.empty(per_batch, dtype=np.int64) if mine else None
            dom = np.empty(per_batch, dtype=np.int64) if mine else None
            pos = 0
            while pos < per_batch:
                if pending is None:
                    pending = (next(sampler), 0)
                unit, used = pending
                take = min(unit.length - used, per_batch - pos)
                if mine:
                    s = unit.start + used
                    ids[pos:pos + take] = self.tokens[unit.domain][s:s + take]
                    dom[pos:pos + take] = unit.domain
                pos += take
                pending = None if used + take == unit.length else (unit, used + take)
            if mine:
                yield {"input_ids": torch.from_numpy(ids.reshape(self.batch_size, row)),
                       "domain_ids": torch.from_numpy(dom.reshape(self.batch_size, row))}
            b += 1

    @staticmethod
    def _skip(sampler: MixtureSampler, n_tokens: int):
        """Advance the stream by ``n_tokens`` looking at unit lengths only; returns the
        unit the skip ends inside, with how much of it was skipped, or None."""
        while n_tokens > 0:
            unit = next(sampler)
            if unit.length > n_tokens:
                return unit, n_tokens
            n_tokens -= unit.length
        return None


class PackedLoader:
    """A ``DataLoader`` over :class:`PackedBatches` that can be saved and resumed.

    ``for batch in loader`` runs until the caller stops; ``state_dict()`` after k
    batches lets a fresh loader continue with batch k+1, for any ``num_workers``."""

    def __init__(self, corpus: TokenizedCorpus, schedule: MixtureSchedule, seq_len: int,
                 batch_size: int, seed: int = 0, max_chunk_tokens: int = 1024,
                 num_workers: int = 0) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.corpus, self.schedule = corpus, schedule
        self.settings = {"seq_len": seq_len, "batch_size": batch_size, "seed": seed,
                         "max_chunk_tokens": max_chunk_tokens,
                         "domains": list(schedule.domains),
                         "total_tokens": schedule.total_tokens}
        self.num_workers = num_workers
        self.batches_done = 0
        PackedBatches(corpus, schedule, seq_len, batch_size, seed, max_chunk_tokens)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        s = self.settings
        dataset = PackedBatches(self.corpus, self.schedule, s["seq_len"], s["batch_size"],
                                s["seed"], s["max_chunk_tokens"], start_batch=self.batches_done)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers)
        for batch in loader:
            self.batches_done += 1
            yield batch

    @classmethod
    def from_prepared(cls, directory: str, seq_len: int, batch_size: int,
                      num_workers: int = 0) -> "PackedLoader":
        """The loader over what ``dsv3 data prepare`` wrote to ``directory``
        (``tokens/`` and the schedule in ``mixture.json``)."""
        path = os.path.join(directory, "mixture.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"directory: no mixture.json in {directory!r} "
                                    f"(write it with `dsv3 data prepare`)")
        with open(path) as f:
            mix = json.load(f)
        corpus = TokenizedCorpus.load(os.path.join(directory, "tokens"))
        schedule = MixtureSchedule(mix["weights"], mix["total_tokens"])
        return cls(corpus, schedule, seq_len, batch_size, seed=mix["seed"],
                   max_chunk_tokens=mix["max_chunk_tokens"], num_workers=num_workers)

    @property
    def vocab_size(self) -> int:
        return self.corpus.vocab_size

    @property
    def eos_id(self) -> int:
        """The end-of-text token closing every document (the model's vocabulary needs it)."""
        return self.corpus.eos_id

    def state_dict(self) -> dict:
        return {"batches_done": self.batches_done, **self.settings}

    def load_state_dict(self, state: dict) -> None:
        for key, value in self.settings.items():
            if state.get(key) != value:
                raise ValueError(f"state: saved with {key}={state.get(key)!r}, this loader has "
                                 f"{key}={value!r}; the stream would differ")
        self.batches_done = int(state["batches_done"])
