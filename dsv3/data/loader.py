"""Packed fixed-length training batches from the mixture stream, as a stateful loader.

The mixture sampler's units are concatenated into one token stream and cut into rows
of ``seq_len + 1`` tokens (input = row[:-1], target = row[1:]); a document may span
rows, and the end-of-text token marks its end. Each row also carries the domain id of
every token, so per-domain losses and the realized mixture can be measured.

Worker-count independence: batch ``b`` is built by worker ``b % num_workers``, which
is exactly the order in which ``torch.utils.data.DataLoader`` collects from its
workers, and every worker walks the same deterministic unit stream (copying tokens
only for its own batches). Any ``num_workers`` therefore yields the same batches.

Resumability: :class:`PackedLoader` advances a lengths-only copy of the stream cursor
for every batch it hands out (a few microseconds per 1k-token unit), so its
``state_dict`` holds the exact stream position; after ``load_state_dict`` the workers
start there, with nothing to replay however long the run has been.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dsv3.data.mixture import MixtureSampler, MixtureSchedule, Unit
from dsv3.data.movein import check_complete
from dsv3.data.tokenizer import TokenizedCorpus


class StreamCursor:
    """A position in the packed token stream: the sampler's state plus the unit a
    batch boundary cut, with how much of it is used. Workers read tokens through it;
    the loader keeps a lengths-only copy in step with what it has handed out, so its
    saved state resumes without replaying the stream."""

    def __init__(self, sampler: MixtureSampler, state: dict | None = None) -> None:
        self.sampler = sampler
        self.pending: tuple[Unit, int] | None = None
        if state is not None:
            sampler.load_state_dict(state["sampler"])
            p = state["pending"]
            self.pending = None if p is None else (Unit(p[0], p[1], p[2]), p[3])

    def state_dict(self) -> dict:
        p = self.pending
        return {"sampler": self.sampler.state_dict(),
                "pending": None if p is None else [p[0].domain, p[0].start, p[0].length, p[1]]}

    def take(self, n_tokens: int, tokens: list | None = None):
        """Advance by ``n_tokens``; with the domains' ``tokens``, also return them and
        their domain ids (int64 arrays), else only move (lengths only)."""
        ids = np.empty(n_tokens, dtype=np.int64) if tokens is not None else None
        dom = np.empty(n_tokens, dtype=np.int64) if tokens is not None else None
        pos = 0
        while pos < n_tokens:
            if self.pending is None:
                self.pending = (next(self.sampler), 0)
            unit, used = self.pending
            take = min(unit.length - used, n_tokens - pos)
            if tokens is not None:
                s = unit.start + used
                ids[pos:pos + take] = tokens[unit.domain][s:s + take]
                dom[pos:pos + take] = unit.domain
            pos += take
            self.pending = None if used + take == unit.length else (unit, used + take)
        return ids, dom


class PackedBatches(IterableDataset):
    """Infinite stream of ``{"input_ids": int64 [B, L+1], "domain_ids": int64 [B, L+1]}``
    from stream position ``start`` (a :meth:`StreamCursor.state_dict`; None: the start)."""

    def __init__(self, corpus: TokenizedCorpus, schedule: MixtureSchedule, seq_len: int,
                 batch_size: int, seed: int = 0, max_chunk_tokens: int = 1024,
                 start: dict | None = None, shard: int = 0, n_shards: int = 1) -> None:
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.corpus, self.schedule = corpus, schedule
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.max_chunk_tokens, self.start = max_chunk_tokens, start
        self.shard, self.n_shards = shard, n_shards
        self.tokens = [corpus.tokens[d] for d in schedule.domains]
        # validate the domains and the start position now, not in a worker
        self._cursor()

    def _cursor(self) -> StreamCursor:
        return StreamCursor(MixtureSampler(self.schedule, self.corpus.offsets, self.seed,
                                           self.max_chunk_tokens, self.shard, self.n_shards),
                            self.start)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        cursor = self._cursor()
        row = self.seq_len + 1
        b = 0
        while True:
            mine = b % n_workers == worker
            ids, dom = cursor.take(self.batch_size * row, self.tokens if mine else None)
            if mine:
                yield {"input_ids": torch.from_numpy(ids.reshape(self.batch_size, row)),
                       "domain_ids": torch.from_numpy(dom.reshape(self.batch_size, row))}
            b += 1


class PackedLoader:
    """A ``DataLoader`` over :class:`PackedBatches` that can be saved and resumed.

    ``for batch in loader`` runs until the caller stops; ``state_dict()`` after k
    batches lets a fresh loader continue with batch k+1, for any ``num_workers``."""

    def __init__(self, corpus: TokenizedCorpus, schedule: MixtureSchedule, seq_len: int,
                 batch_size: int, seed: int = 0, max_chunk_tokens: int = 1024,
                 num_workers: int = 0, shard: int = 0, n_shards: int = 1) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.corpus, self.schedule = corpus, schedule
        self.settings = {"seq_len": seq_len, "batch_size": batch_size, "seed": seed,
                         "max_chunk_tokens": max_chunk_tokens,
                         "domains": list(schedule.domains),
                         "total_tokens": schedule.total_tokens,
                         "shard": shard, "n_shards": n_shards}
        self.num_workers = num_workers
        self.batches_done = 0
        self._tokens_per_batch = batch_size * (seq_len + 1)
        # lengths-only twin of the workers' cursor, advanced per batch handed out
        self._position = PackedBatches(corpus, schedule, seq_len, batch_size, seed,
                                       max_chunk_tokens, shard=shard, n_shards=n_shards)._cursor()

    def document_positions(self) -> dict[str, list[int]]:
        """Where the batches handed out so far left each domain's documents
        (MixtureSampler.document_positions): at the first token not handed out, in
        the unit the last batch cut too (its rest was skipped by the next stage)."""
        return self._position.sampler.document_positions(self._position.pending)

    @property
    def shuffle(self) -> str:
        """How the sampler orders each domain's documents (MixtureSampler._order)."""
        return self._position.sampler.shuffle

    def continue_documents(self, positions: dict, shuffle: str | None = None) -> None:
        """Before the first batch: read on from ``positions`` (another loader's
        document_positions over the same documents, in the permutations of its
        ``shuffle``), not from the first document."""
        if self.batches_done:
            raise RuntimeError("continue_documents: this loader has handed out batches")
        self._position.sampler.continue_documents(positions, shuffle)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        s = self.settings
        dataset = PackedBatches(self.corpus, self.schedule, s["seq_len"], s["batch_size"],
                                s["seed"], s["max_chunk_tokens"],
                                start=self._position.state_dict(), shard=s["shard"],
                                n_shards=s["n_shards"])
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers)
        for batch in loader:
            self.batches_done += 1
            self._position.take(self._tokens_per_batch)
            yield batch

    @classmethod
    def from_prepared(cls, directory: str, seq_len: int, batch_size: int,
                      num_workers: int = 0) -> "PackedLoader":
        """The loader over what ``dsv3 data prepare`` wrote to ``directory``
        (``tokens/`` and the schedule in ``mixture.json``): its training documents,
        not the held-out ones (dsv3.data.heldout). Data prepared before the held-out
        choice was made there has none marked: all its documents are read."""
        check_complete(directory, "directory")  # mid-update: tokens of two runs
        path = os.path.join(directory, "mixture.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"directory: no mixture.json in {directory!r} "
                                    f"(write it with `dsv3 data prepare`)")
        with open(path) as f:
            mix = json.load(f)
        corpus = TokenizedCorpus.load(os.path.join(directory, "tokens")).training_part()
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
        """Plain data (JSON-able): batches handed out, the stream position after them,
        and the settings that shape the stream."""
        return {"batches_done": self.batches_done, "position": self._position.state_dict(),
                **self.settings}

    def load_state_dict(self, state: dict) -> None:
        state = {"shard": 0, "n_shards": 1, **state}  # saved before ranks shared documents
        for key, value in self.settings.items():
            if state.get(key) != value:
                raise ValueError(f"state: saved with {key}={state.get(key)!r}, this loader has "
                                 f"{key}={value!r}; the stream would differ")
        self._position = StreamCursor(self._position.sampler, state["position"])
        self.batches_done = int(state["batches_done"])
