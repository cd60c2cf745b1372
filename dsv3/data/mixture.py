"""Scheduled domain mixture: which domain the next tokens come from, deterministically.

A :class:`MixtureSchedule` gives each domain a token share as a piecewise-linear
function of training progress (tokens sampled / ``total_tokens``), e.g. tech
0.25 -> 0.18 while finance goes 0.18 -> 0.21; shares must sum to 1 at every point.

:class:`MixtureSampler` turns it into a stream of *units* (a chunk of at most
``max_chunk_tokens`` tokens of one document) with a deficit rule instead of random
draws: every domain accrues target tokens at its current share of each emitted unit,
and a new document comes from the domain furthest behind its target. A document's
chunks follow one another: interleaved with other domains' units, a chunk cut
mid-document ran straight into another document's text, with no end-of-text between
them, and its next chunk came after that document without its own beginning. The
realized share then tracks the schedule to within about one document per domain at
every point of the stream (random draws would drift by the square root of the
document count), there is no random state to carry, and the sampler's whole state is
a few numbers per domain. Randomness only orders documents inside a domain: a
permutation seeded by (seed, domain, epoch), re-drawn each time a domain is exhausted
and repeats. Data-parallel ranks each read a share of every permutation (``shard`` of
``n_shards``), so no document is read twice in an epoch; a domain of fewer documents
than ranks is read whole by each, from a different document.

What it costs: the stream is a pure function of (schedule, document lengths, seed),
so to start at token N a fresh sampler replays the choices up to N (lengths only,
about a microsecond per unit) unless it is given a saved :meth:`state_dict`.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

WeightSpec = float | Sequence[float] | Sequence[Sequence[float]]
# How far from 1 a row of shares may sum. Configs and prepared mixture.json files
# were written against 1e-6 (three shares of 0.3333333 sum to 0.9999999), so this is
# the contract; rows are then divided by their sum, so the sampler draws from exact
# shares whatever the rounding.
SUM_TOLERANCE = 1e-6


def _points(name: str, spec: WeightSpec) -> list[tuple[float, float]]:
    """A domain's schedule as (progress, weight) points: a constant, [start, end] or
    [[progress, weight], ...]."""
    if isinstance(spec, (int, float)):
        pts = [(0.0, float(spec)), (1.0, float(spec))]
    elif len(spec) == 2 and all(isinstance(x, (int, float)) for x in spec):
        pts = [(0.0, float(spec[0])), (1.0, float(spec[1]))]
    elif len(spec) > 0 and all(isinstance(x, (list, tuple)) and len(x) == 2 for x in spec):
        pts = [(float(p), float(w)) for p, w in spec]
    else:
        raise ValueError(f"weights[{name!r}]: expected a number, [start, end] or "
                         f"[[progress, weight], ...], got {spec!r}")
    # NaN compares False with everything, so it would pass every check below and then
    # poison the whole row of shares
    if not all(math.isfinite(x) for pt in pts for x in pt):
        raise ValueError(f"weights[{name!r}]: progress points and weights must be finite, "
                         f"got {pts}")
    progress = [p for p, _ in pts]
    if progress[0] != 0.0 or progress[-1] != 1.0 or progress != sorted(set(progress)):
        raise ValueError(f"weights[{name!r}]: progress points must rise strictly from 0 to 1, "
                         f"got {progress}")
    if any(w < 0 for _, w in pts):
        raise ValueError(f"weights[{name!r}]: weights must be >= 0, got {[w for _, w in pts]}")
    return pts


def _check_sums(breakpoints: list[float], table: np.ndarray) -> None:
    """Each row of shares sums to 1 within SUM_TOLERANCE: 0.3333333 x 3 is rounding,
    0.5 + 0.4 is a mistyped config."""
    for b, row in zip(breakpoints, table):
        if abs(row.sum() - 1.0) > SUM_TOLERANCE:
            raise ValueError(f"weights: shares must sum to 1 at every progress point; at "
                             f"progress {b:g} they sum to {row.sum():.12g}")


class MixtureSchedule:
    """Per-domain token shares over progress; ``domains`` keeps the config's order."""

    def __init__(self, weights: Mapping[str, WeightSpec], total_tokens: int) -> None:
        if not weights:
            raise ValueError("weights: at least one domain is needed")
        if not isinstance(total_tokens, int) or total_tokens <= 0:
            raise ValueError(f"total_tokens must be a positive int, got {total_tokens!r}")
        self.domains = list(weights)
        self.total_tokens = total_tokens
        per_domain = [_points(d, weights[d]) for d in self.domains]
        # Sum of piecewise-linear functions is piecewise linear on the union of the
        # breakpoints, so checking the sum there checks it everywhere.
        self.breakpoints = sorted({p for pts in per_domain for p, _ in pts})
        self.table = np.array([[np.interp(b, [p for p, _ in pts], [w for _, w in pts])
                                for pts in per_domain] for b in self.breakpoints])
        _check_sums(self.breakpoints, self.table)
        # exact shares: a row of 0.3333333s would otherwise leave every domain's target
        # 1e-7 per token short of what it is given (a zero share stays exactly zero)
        self.table = self.table / self.table.sum(axis=1, keepdims=True)
        self._rows = self.table.tolist()

    def weights_at(self, progress: float) -> list[float]:
        """Shares at ``progress`` (clamped to [0, 1]: past the end the final mix holds)."""
        p = min(max(progress, 0.0), 1.0)
        k = min(bisect.bisect_right(self.breakpoints, p) - 1, len(self.breakpoints) - 2)
        if k < 0:
            return list(self._rows[0])
        b0, b1 = self.breakpoints[k], self.breakpoints[k + 1]
        t = (p - b0) / (b1 - b0)
        lo, hi = self._rows[k], self._rows[k + 1]
        return [a + (c - a) * t for a, c in zip(lo, hi)]

    def weights_at_many(self, progress: np.ndarray) -> np.ndarray:
        """Shares at many progress points at once: [len(progress), n_domains]."""
        p = np.clip(np.asarray(progress, dtype=np.float64), 0.0, 1.0)
        return np.stack([np.interp(p, self.breakpoints, self.table[:, d])
                         for d in range(len(self.domains))], axis=1)

    def mean_weights(self, start_token: int, end_token: int, samples: int = 513) -> np.ndarray:
        """Average share of each domain over a token range (what a window should hold)."""
        xs = np.linspace(start_token, end_token, samples) / self.total_tokens
        return self.weights_at_many(xs).mean(axis=0)


@dataclass
class Unit:
    """A piece of one document: tokens [start, start + length) of a domain's token array."""
    domain: int
    start: int
    length: int


class MixtureSampler:
    """Deterministic stream of :class:`Unit`s following a schedule.

    ``doc_offsets[domain]``: document boundaries into that domain's token array
    (n_docs + 1 increasing offsets, as written by :mod:`dsv3.data.tokenize`)."""

    def __init__(self, schedule: MixtureSchedule, doc_offsets: Mapping[str, np.ndarray],
                 seed: int = 0, max_chunk_tokens: int = 1024, shard: int = 0,
                 n_shards: int = 1) -> None:
        missing = [d for d in schedule.domains if d not in doc_offsets]
        if missing:
            raise ValueError(f"doc_offsets: no documents for scheduled domains {missing}")
        if max_chunk_tokens < 1:
            raise ValueError(f"max_chunk_tokens must be >= 1, got {max_chunk_tokens}")
        if not 0 <= shard < n_shards:
            raise ValueError(f"shard must be in [0, n_shards={n_shards}), got {shard}")
        self.schedule, self.seed, self.max_chunk = schedule, seed, max_chunk_tokens
        self.shard, self.n_shards = shard, n_shards
        self.offsets = [np.asarray(doc_offsets[d], dtype=np.int64) for d in schedule.domains]
        for name, off in zip(schedule.domains, self.offsets):
            if len(off) < 2 or (np.diff(off) <= 0).any():
                raise ValueError(f"doc_offsets[{name!r}]: need >= 1 document and strictly "
                                 f"increasing offsets")
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}
        self.load_state_dict(self._initial_state())

    def _initial_state(self) -> dict:
        n = len(self.offsets)
        return {"tokens": 0, "target": [0.0] * n, "actual": [0] * n,
                "cursor": [[0, 0, 0] for _ in range(n)]}  # epoch, doc position, chunk

    def state_dict(self) -> dict:
        return {"tokens": self.tokens, "target": list(self.target), "actual": list(self.actual),
                "cursor": [list(c) for c in self.cursor]}

    def load_state_dict(self, state: dict) -> None:
        n = len(self.offsets)
        if len(state["target"]) != n or len(state["cursor"]) != n:
            raise ValueError(f"state: saved for {len(state['target'])} domains, sampler has {n}")
        self.tokens = int(state["tokens"])
        self.target = [float(x) for x in state["target"]]
        self.actual = [int(x) for x in state["actual"]]
        self.cursor = [list(map(int, c)) for c in state["cursor"]]

    def _order(self, d: int, epoch: int) -> np.ndarray:
        """Domain ``d``'s documents in epoch ``epoch``, this shard's share of them."""
        cached = self._perm_cache.get(d)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, d, epoch])
            order = rng.permutation(len(self.offsets[d]) - 1)
            if len(order) >= self.n_shards:
                order = order[self.shard::self.n_shards]
            else:  # too few to share: every rank reads them all, from its own first one
                order = np.roll(order, -self.shard)
            cached = (epoch, order)
            self._perm_cache[d] = cached
        return cached[1]

    def _next_unit_of(self, d: int) -> Unit:
        epoch, pos, chunk = self.cursor[d]
        order = self._order(d, epoch)
        doc = int(order[pos])
        start, end = int(self.offsets[d][doc]), int(self.offsets[d][doc + 1])
        begin = start + chunk * self.max_chunk
        next_document = [epoch, pos + 1, 0] if pos + 1 < len(order) else [epoch + 1, 0, 0]
        if begin >= end:  # carried from a sampler of longer chunks: the document is read
            self.cursor[d] = next_document
            return self._next_unit_of(d)
        length = min(self.max_chunk, end - begin)
        self.cursor[d] = [epoch, pos, chunk + 1] if begin + length < end else next_document
        return Unit(d, begin, length)

    def __iter__(self):
        return self

    def __next__(self) -> Unit:
        weights = self.schedule.weights_at(self.tokens / self.schedule.total_tokens)
        target, actual = self.target, self.actual
        # a document begun goes on (chunk > 0); else the wanted domain furthest behind its
        # target, the earlier one on a tie. A domain at share 0 is never drawn, even when
        # rounding leaves every wanted one ahead, nor its begun document continued.
        wanted = [i for i, w in enumerate(weights) if w > 0]
        begun = [i for i in wanted if self.cursor[i][2] > 0]
        d = begun[0] if begun else max(wanted, key=lambda i: (target[i] - actual[i], -i))
        unit = self._next_unit_of(d)
        n = unit.length
        for i, w in enumerate(weights):
            target[i] += w * n
        actual[d] += n
        self.tokens += n
        return unit

    def document_positions(self) -> dict[str, list[int]]:
        """Where each domain's reading stands, by name: [epoch, position in the epoch's
        order, tokens read of the current document]. Another sampler over the same
        documents (a later training stage's, of another schedule) continues from it
        with :meth:`continue_documents`, rather than reading the same documents again."""
        return {name: [epoch, pos, chunk * self.max_chunk]
                for name, (epoch, pos, chunk) in zip(self.schedule.domains, self.cursor)}

    def continue_documents(self, positions: Mapping[str, Sequence[int]]) -> None:
        """Start each named domain's reading at ``positions`` (document_positions'),
        a begun document at its next whole chunk of this sampler's size."""
        for d, name in enumerate(self.schedule.domains):
            if name in positions:
                epoch, pos, read = (int(v) for v in positions[name])
                self.cursor[d] = [epoch, pos, -(-read // self.max_chunk)]

    def epochs(self) -> dict[str, int]:
        """Completed passes over each domain (a domain repeats when exhausted)."""
        return {name: c[0] for name, c in zip(self.schedule.domains, self.cursor)}
