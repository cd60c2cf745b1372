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
a few numbers per domain. A document begun is finished even if its domain's share
falls to 0 meanwhile (at most its rest over the share). Randomness only orders
documents inside a domain: a permutation seeded by (seed, domain name, epoch),
re-drawn each time a domain is exhausted and repeats. Data-parallel ranks each read a
run of every permutation holding about 1/``n_shards`` of its tokens (``shard`` of
``n_shards``), so no document is read twice in an epoch and the ranks reach its end
together; a domain that cannot be shared so (fewer documents than ranks, or one
document holding most of its text) is read whole by each, from a different document.
A later sampler (the next training stage's) reads on from where another stopped
(:meth:`MixtureSampler.document_positions`, :meth:`MixtureSampler.continue_documents`).

What it costs: the stream is a pure function of (schedule, document lengths, seed),
so to start at token N a fresh sampler replays the choices up to N (lengths only,
about a microsecond per unit) unless it is given a saved :meth:`state_dict`.
"""
from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from dsv3.validate import whole_number

WeightSpec = float | Sequence[float] | Sequence[Sequence[float]]
# How far from 1 a row of shares may sum. Configs and prepared mixture.json files
# were written against 1e-6 (three shares of 0.3333333 sum to 0.9999999), so this is
# the contract; rows are then divided by their sum, so the sampler draws from exact
# shares whatever the rounding.
SUM_TOLERANCE = 1e-6
# How a new sampler orders each domain's documents (MixtureSampler._order).
SHUFFLE = "name"


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
        # checked here, not on the first batch in a worker ("slice indices must be
        # integers" for a max_chunk_tokens of 512.0 from a hand-edited mixture.json)
        whole_number("max_chunk_tokens", max_chunk_tokens, 1)
        whole_number("n_shards", n_shards, 1)
        whole_number("seed", seed, 0)
        whole_number("shard", shard, 0)
        if shard >= n_shards:
            raise ValueError(f"shard must be in [0, n_shards={n_shards}), got {shard}")
        self.schedule, self.seed, self.max_chunk = schedule, seed, max_chunk_tokens
        self.shard, self.n_shards = shard, n_shards
        self.shuffle = SHUFFLE  # a state saved before it was kept loads as "position"
        self.offsets = [np.asarray(doc_offsets[d], dtype=np.int64) for d in schedule.domains]
        for name, off in zip(schedule.domains, self.offsets):
            if len(off) < 2 or (np.diff(off) <= 0).any():
                raise ValueError(f"doc_offsets[{name!r}]: need >= 1 document and strictly "
                                 f"increasing offsets")
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}
        self.load_state_dict(self._initial_state())

    def _initial_state(self) -> dict:
        n = len(self.offsets)
        # per domain: epoch, position in the epoch's order, tokens read of that document
        return {"tokens": 0, "target": [0.0] * n, "actual": [0] * n,
                "cursor": [[0, 0, 0] for _ in range(n)], "cursor_unit": "tokens",
                "shuffle": self.shuffle}

    def state_dict(self) -> dict:
        return {"tokens": self.tokens, "target": list(self.target), "actual": list(self.actual),
                "cursor": [list(c) for c in self.cursor], "cursor_unit": "tokens",
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        n = len(self.offsets)
        if len(state["target"]) != n or len(state["cursor"]) != n:
            raise ValueError(f"state: saved for {len(state['target'])} domains, sampler has {n}")
        self.tokens = int(state["tokens"])
        self.target = [float(x) for x in state["target"]]
        self.actual = [int(x) for x in state["actual"]]
        self.cursor = [list(map(int, c)) for c in state["cursor"]]
        if state.get("cursor_unit") != "tokens":  # saved counting chunks read
            self.cursor = [[e, p, chunk * self.max_chunk] for e, p, chunk in self.cursor]
        self._set_shuffle(state.get("shuffle", "position"))

    def _set_shuffle(self, shuffle: str) -> None:
        if shuffle not in ("name", "position"):
            raise ValueError(f"state: unknown shuffle {shuffle!r}")
        if shuffle != self.shuffle:
            self.shuffle = shuffle
            self._perm_cache.clear()

    def _order(self, d: int, epoch: int) -> np.ndarray:
        """Domain ``d``'s documents in epoch ``epoch``, this shard's share of them.

        Seeded by the domain's name: seeded by its place in the schedule (``shuffle``
        "position", kept for runs saved with it), a stage whose schedule lists the
        domains in another order read the same position of another permutation,
        reading again documents the stage before had read and skipping others. The
        shares are runs of the permutation of about equal tokens: dealt out one by
        one, a rank whose share held fewer tokens began its next epoch while another
        was still reading this one."""
        cached = self._perm_cache.get(d)
        if cached is None or cached[0] != epoch:
            if self.shuffle == "name":
                name = self.schedule.domains[d].encode()
                key = int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "big")
                order = np.random.default_rng([self.seed, key, epoch]).permutation(
                    len(self.offsets[d]) - 1)
                order = self._token_share(d, order)
            else:
                order = np.random.default_rng([self.seed, d, epoch]).permutation(
                    len(self.offsets[d]) - 1)
                if len(order) >= self.n_shards:
                    order = order[self.shard::self.n_shards]
                else:  # too few to share: every rank reads them all, from its own first
                    order = np.roll(order, -self.shard)
            cached = (epoch, order)
            self._perm_cache[d] = cached
        return cached[1]

    def _token_share(self, d: int, order: np.ndarray) -> np.ndarray:
        """This shard's run of ``order``: the documents that start in its n_shards-th of
        the permutation's tokens. Where some shard would get none (fewer documents than
        ranks, or one document holding most of the tokens), every rank reads them all,
        from its own first one."""
        if self.n_shards == 1:
            return order
        lengths = np.diff(self.offsets[d])[order]
        before = np.cumsum(lengths) - lengths
        owner = before * self.n_shards // int(lengths.sum())
        if len(np.unique(owner)) < self.n_shards:
            return np.roll(order, -self.shard)
        return order[owner == self.shard]

    def _next_unit_of(self, d: int) -> Unit:
        epoch, pos, read = self.cursor[d]
        order = self._order(d, epoch)
        doc = int(order[pos])
        start, end = int(self.offsets[d][doc]), int(self.offsets[d][doc + 1])
        begin = start + read
        next_document = [epoch, pos + 1, 0] if pos + 1 < len(order) else [epoch + 1, 0, 0]
        if begin >= end:  # carried past the document's end: it is read
            self.cursor[d] = next_document
            return self._next_unit_of(d)
        length = min(self.max_chunk, end - begin)
        self.cursor[d] = [epoch, pos, read + length] if begin + length < end else next_document
        return Unit(d, begin, length)

    def __iter__(self):
        return self

    def __next__(self) -> Unit:
        weights = self.schedule.weights_at(self.tokens / self.schedule.total_tokens)
        target, actual = self.target, self.actual
        # a document begun goes on, whatever its domain's share now (one left at share 0
        # mid-document ran into another domain's text with no end-of-text: the share
        # overshoots by at most that document's rest); else the wanted domain furthest
        # behind its target, the earlier one on a tie. A domain at share 0 is never
        # drawn for a new document, even when rounding leaves every wanted one ahead.
        wanted = [i for i, w in enumerate(weights) if w > 0]
        begun = [i for i in range(len(weights)) if self.cursor[i][2] > 0]
        d = begun[0] if begun else max(wanted, key=lambda i: (target[i] - actual[i], -i))
        unit = self._next_unit_of(d)
        n = unit.length
        for i, w in enumerate(weights):
            target[i] += w * n
        actual[d] += n
        self.tokens += n
        return unit

    def document_positions(self, pending: tuple[Unit, int] | None = None
                           ) -> dict[str, list[int]]:
        """Where each domain's reading stands, by name: [epoch, position in the epoch's
        order, tokens read of the current document]. Another sampler over the same
        documents (a later training stage's, of another schedule) continues from it
        with :meth:`continue_documents`, rather than reading the same documents again.
        ``pending``: the last unit drawn and how many of its tokens were used (a batch
        cut it): its domain stands at the first token not used, not after the unit."""
        positions = {name: list(c) for name, c in zip(self.schedule.domains, self.cursor)}
        if pending is not None:
            unit, used = pending
            d, offsets = unit.domain, self.offsets[unit.domain]
            epoch, pos, read = self.cursor[d]
            if read == 0:  # the unit ended its document: the cursor moved to the next
                pos -= 1
                if pos < 0:
                    epoch -= 1
                    pos = len(self._order(d, epoch)) - 1
            doc = int(np.searchsorted(offsets, unit.start, side="right")) - 1
            positions[self.schedule.domains[d]] = [epoch, pos,
                                                   unit.start + used - int(offsets[doc])]
        return positions

    def continue_documents(self, positions: Mapping[str, Sequence[int]],
                           shuffle: str | None = None) -> None:
        """Start each named domain's reading at ``positions`` (document_positions'), in
        the permutations of ``shuffle`` (the other sampler's; None: this one's)."""
        if shuffle is not None:
            self._set_shuffle(shuffle)
        for d, name in enumerate(self.schedule.domains):
            if name in positions:
                self.cursor[d] = [int(v) for v in positions[name]]

    def epochs(self) -> dict[str, int]:
        """Completed passes over each domain (a domain repeats when exhausted)."""
        return {name: c[0] for name, c in zip(self.schedule.domains, self.cursor)}
