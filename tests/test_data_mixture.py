"""Scheduled domain mixture: the issue's targets (every 1M-token window within 0.5 pp of
its scheduled share; the same stream after resume; the same batches for any number of
DataLoader workers), plus schedule validation."""
import json

import numpy as np
import pytest
import torch

from dsv3.data.loader import PackedLoader
from dsv3.data.mixture import MixtureSampler, MixtureSchedule
from dsv3.data.tokenizer import TokenizedCorpus

# A DeepSeek-V3-style recipe shape: 12 domains, some shares rising, some falling.
RECIPE = {"web": [0.20, 0.14], "tech": [0.25, 0.18], "finance": [0.18, 0.21],
          "code": [0.08, 0.12], "math": [0.05, 0.08], "books": [0.06, 0.06],
          "papers": [0.04, 0.05], "news": [0.04, 0.03], "wiki": [0.03, 0.04],
          "law": [0.02, 0.03], "medical": [0.03, 0.04], "dialogue": [0.02, 0.02]}


def synthetic_offsets(rng, domains, docs=400, max_len=30_000):
    """Long-tailed document lengths (1 to 30k tokens), like web text with a few books."""
    return {d: np.concatenate([[0], np.cumsum(np.clip(rng.lognormal(6, 1.5, docs).astype(int),
                                                      1, max_len))]) for d in domains}


def unit_stream(sampler, n_tokens):
    doms, lens = [], []
    total = 0
    while total < n_tokens:
        u = next(sampler)
        doms.append(u.domain)
        lens.append(u.length)
        total += u.length
    return np.array(doms), np.array(lens)


def max_window_deviation(schedule, doms, lens, window):
    """Largest |realized - scheduled| token share of any domain over *every* window of
    ``window`` consecutive tokens. A window's realized share is piecewise linear in its
    start, with kinks only where its start or end crosses a unit boundary, so checking
    the windows that start or end on a boundary checks them all. The scheduled share
    of a window is the weight at its midpoint: exact for schedules linear in progress."""
    n = len(schedule.domains)
    ends = np.cumsum(lens)
    starts = ends - lens
    total = int(ends[-1])
    cum = np.zeros((n, len(lens) + 1))
    for d in range(n):
        cum[d, 1:] = np.cumsum(np.where(doms == d, lens, 0))

    def tokens_before(x):  # [len(x), n]: tokens of each domain among the first x
        k = np.searchsorted(ends, x, side="right")
        out = cum[:, k].T.copy()
        inside = k < len(lens)
        out[np.nonzero(inside)[0], doms[k[inside]]] += x[inside] - starts[k[inside]]
        return out

    a = np.concatenate([starts, ends - window])
    a = np.unique(a[(a >= 0) & (a + window <= total)])
    real = (tokens_before(a + window) - tokens_before(a)) / window
    target = schedule.weights_at_many((a + window / 2) / schedule.total_tokens)
    return float(np.abs(real - target).max()), len(a)


@pytest.mark.parametrize("max_len", [1024, 30_000], ids=["short", "long-tailed"])
def test_every_1m_token_window_is_within_half_a_point_of_schedule(max_len):
    """Within half a point, plus, where documents are longer than a unit, the longest
    one's share of a window: a document's chunks follow one another."""
    total = 6_000_000
    schedule = MixtureSchedule(RECIPE, total_tokens=total)
    offsets = synthetic_offsets(np.random.default_rng(0), RECIPE, max_len=max_len)
    sampler = MixtureSampler(schedule, offsets, seed=0, max_chunk_tokens=1024)
    doms, lens = unit_stream(sampler, total)
    deviation, n_windows = max_window_deviation(schedule, doms, lens, window=1_000_000)
    assert n_windows > 10_000  # every window, not a sample of them
    longest = max(int(np.diff(o).max()) for o in offsets.values())
    bound = 0.005 + (longest / 1_000_000 if longest > 1024 else 0.0)
    assert deviation < bound, f"max deviation {deviation * 100:.3f} pp"
    # the shares did move over the run: the first and last windows differ as scheduled
    tech = schedule.domains.index("tech")
    first = lens[:np.searchsorted(np.cumsum(lens), 1_000_000)]
    assert (lens[:len(first)][doms[:len(first)] == tech].sum() / first.sum()) > 0.24


def test_schedule_interpolates_and_validates():
    s = MixtureSchedule({"tech": [0.25, 0.18], "finance": [0.18, 0.21], "rest": [0.57, 0.61]},
                        total_tokens=100)
    assert s.weights_at(0.5) == pytest.approx([0.215, 0.195, 0.59])
    assert s.weights_at(7.0) == pytest.approx([0.18, 0.21, 0.61])  # past the end: final mix
    p = MixtureSchedule({"a": [[0, 1.0], [0.5, 0.0], [1, 0.0]], "b": [[0, 0.0], [0.5, 1.0], [1, 1.0]]}, 10)
    assert p.weights_at(0.25) == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="at progress 0 they sum to 0.9"):
        MixtureSchedule({"a": 0.5, "b": 0.4}, 100)
    with pytest.raises(ValueError, match=r"weights\['a'\]: progress points must rise"):
        MixtureSchedule({"a": [[0, 1.0], [0.8, 1.0]]}, 100)
    with pytest.raises(ValueError, match=r"weights\['a'\]: weights must be >= 0"):
        MixtureSchedule({"a": [1.5, -0.5]}, 100)
    with pytest.raises(ValueError, match="total_tokens must be a positive int"):
        MixtureSchedule({"a": 1.0}, 0)
    with pytest.raises(ValueError, match=r"doc_offsets: no documents for scheduled domains \['b'\]"):
        MixtureSampler(MixtureSchedule({"a": 0.5, "b": 0.5}, 10), {"a": np.array([0, 3])})


@pytest.mark.parametrize("weights, message", [
    ({"a": float("nan"), "b": 1.0}, r"weights\['a'\]: progress points and weights must be finite"),
    ({"a": [0.5, float("inf")], "b": 0.5}, r"weights\['a'\]: .* must be finite"),
    ({"a": [[0, 0.5], [float("nan"), 0.5], [1, 0.5]], "b": 0.5}, r"weights\['a'\]: .* finite"),
    ({"a": [], "b": 1.0}, r"weights\['a'\]: expected a number, \[start, end\] or"),
    ({"a": 0.5, "b": 0.499998}, r"at progress 0 they sum to 0.999998"),
])
def test_schedule_rejects_non_finite_empty_and_inexact_weights(weights, message):
    with pytest.raises(ValueError, match=message):
        MixtureSchedule(weights, 1000)


def test_shares_rounded_to_seven_places_load_and_are_drawn_exactly(tmp_path):
    """Configs and mixture.json files written against the 1e-6 tolerance still load
    (1e-9 refused three shares of 0.3333333), and the sampler draws from the shares
    normalised to sum to 1."""
    thirds = {"a": 0.3333333, "b": 0.3333333, "c": 0.3333333}
    schedule = MixtureSchedule(thirds, 100)
    assert sum(schedule.weights_at(0.5)) == pytest.approx(1.0, abs=1e-15)
    assert schedule.weights_at(0.0) == pytest.approx([1 / 3] * 3, abs=1e-15)
    corpus = _corpus(np.random.default_rng(0), list(thirds))
    corpus.save(tmp_path / "tokens")
    (tmp_path / "mixture.json").write_text(json.dumps(
        {"weights": thirds, "total_tokens": 3000, "seed": 0, "max_chunk_tokens": 64}))
    loader = PackedLoader.from_prepared(str(tmp_path), seq_len=15, batch_size=2)
    assert loader.schedule.domains == list(thirds)


@pytest.mark.parametrize("weights", [
    {"a": 0.1, "b": 0.2, "c": 0.7, "z": 0.0},   # sums to 1 only up to rounding
    {"a": [[0, 0.6], [0.5, 1.0], [1, 1.0]], "z": [[0, 0.4], [0.5, 0.0], [1, 0.0]]},
])
def test_a_domain_at_share_zero_is_never_drawn(weights):
    schedule = MixtureSchedule(weights, total_tokens=20_000)
    sampler = MixtureSampler(schedule, {d: np.arange(0, 101) * 7 for d in weights},
                             max_chunk_tokens=7)
    z = schedule.domains.index("z")
    for _ in range(20_000 // 7):
        share = schedule.weights_at(sampler.tokens / schedule.total_tokens)[z]
        if next(sampler).domain == z:
            assert share > 0, f"drawn at share 0 after {sampler.tokens} tokens"


def test_sampler_resumes_from_saved_state_at_any_step():
    schedule = MixtureSchedule(RECIPE, total_tokens=2_000_000)
    offsets = synthetic_offsets(np.random.default_rng(1), RECIPE, docs=50)
    reference = MixtureSampler(schedule, offsets, seed=3)
    full = [next(reference) for _ in range(3000)]
    for k in (0, 1, 17, 1234, 2999):
        s = MixtureSampler(schedule, offsets, seed=3)
        for _ in range(k):
            next(s)
        state = s.state_dict()
        resumed = MixtureSampler(schedule, offsets, seed=3)
        resumed.load_state_dict(state)
        assert [next(resumed) for _ in range(3000 - k)] == full[k:], f"step {k}"


def test_a_documents_chunks_follow_one_another():
    """Chunks of a document were interleaved with other domains' units: a chunk cut
    mid-document ran into another document with no end-of-text between them."""
    schedule = MixtureSchedule({"a": 0.5, "b": 0.5}, total_tokens=10_000)
    offsets = {"a": np.array([0, 100, 200]), "b": np.array([0, 100, 200])}
    s = MixtureSampler(schedule, offsets, seed=0, max_chunk_tokens=30)
    units = [next(s) for _ in range(40)]
    for unit, after in zip(units, units[1:]):
        doc_end = int(offsets["ab"[unit.domain]][np.searchsorted(
            offsets["ab"[unit.domain]], unit.start, side="right")])
        if unit.start + unit.length < doc_end:  # cut mid-document: its next chunk follows
            assert (after.domain, after.start) == (unit.domain, unit.start + unit.length)
    assert {u.domain for u in units} == {0, 1}


def test_each_document_once_per_epoch_then_reshuffled():
    schedule = MixtureSchedule({"only": 1.0}, total_tokens=1000)
    offsets = {"only": np.arange(0, 11) * 5}  # 10 docs of 5 tokens
    s = MixtureSampler(schedule, offsets, seed=0, max_chunk_tokens=100)
    first, second = [next(s).start for _ in range(10)], [next(s).start for _ in range(10)]
    assert sorted(first) == sorted(second) == list(range(0, 50, 5))
    assert first != second and s.epochs() == {"only": 2}


def _corpus(rng, domains):
    """Token values encode their domain (value // 10**6), so rows can be checked."""
    offsets = synthetic_offsets(rng, domains, docs=60, max_len=3000)
    tokens = {d: (i * 10**6 + np.arange(offsets[d][-1]) % 10**6).astype(np.uint32)
              for i, d in enumerate(domains)}
    return TokenizedCorpus(tokens, offsets, eos_id=0, vocab_size=2**32)


def _batches(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 3 workers on 2 cores
def test_loader_same_batches_for_any_worker_count_and_after_resume():
    domains = list(RECIPE)[:4]
    schedule = MixtureSchedule({"web": [0.4, 0.1], "tech": [0.3, 0.3], "finance": [0.2, 0.3],
                                "code": [0.1, 0.3]}, total_tokens=200_000)
    corpus = _corpus(np.random.default_rng(2), domains)
    kwargs = dict(seq_len=127, batch_size=4, seed=5, max_chunk_tokens=300)
    serial = _batches(PackedLoader(corpus, schedule, **kwargs), 12)
    for b in serial:
        assert b["input_ids"].shape == (4, 128) and b["input_ids"].dtype == torch.int64
        assert torch.equal(b["input_ids"] // 10**6, b["domain_ids"])
    for workers in (2, 3):
        par = _batches(PackedLoader(corpus, schedule, num_workers=workers, **kwargs), 12)
        for i, (a, b) in enumerate(zip(serial, par)):
            assert torch.equal(a["input_ids"], b["input_ids"]), f"{workers} workers, batch {i}"
    for k in (1, 5, 9):
        first = PackedLoader(corpus, schedule, **kwargs)
        _batches(first, k)
        state = json.loads(json.dumps(first.state_dict()))  # checkpoints hold plain data
        resumed = PackedLoader(corpus, schedule, num_workers=2 if k == 5 else 0, **kwargs)
        resumed.load_state_dict(state)
        rest = _batches(resumed, 12 - k)
        for i, b in enumerate(rest):
            assert torch.equal(b["input_ids"], serial[k + i]["input_ids"]), f"resume {k}, +{i}"
        assert resumed.state_dict()["batches_done"] == 12
    # batch boundaries cut units: a resume must pick up inside one, not at the next unit
    cuts = []
    for k in (1, 5, 9):
        loader = PackedLoader(corpus, schedule, **kwargs)
        _batches(loader, k)
        cuts.append(loader.state_dict()["position"]["pending"])
    assert any(p is not None for p in cuts)


def test_loader_state_mismatch_is_an_error():
    schedule = MixtureSchedule({"web": 1.0}, total_tokens=1000)
    corpus = _corpus(np.random.default_rng(0), ["web"])
    state = PackedLoader(corpus, schedule, seq_len=16, batch_size=2).state_dict()
    other = PackedLoader(corpus, schedule, seq_len=32, batch_size=2)
    with pytest.raises(ValueError, match="state: saved with seq_len=16, this loader has seq_len=32"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len must be a positive int, got 0"):
        PackedLoader(corpus, schedule, seq_len=0, batch_size=2)


# --- the hand-over between stages, and the ranks' shares (a review's findings) --------

def _read(sampler, n_units):
    """(domain name, document start) of each unit's document, for n units."""
    out = []
    for _ in range(n_units):
        u = next(sampler)
        name = sampler.schedule.domains[u.domain]
        offsets = sampler.offsets[u.domain]
        out.append((name, int(offsets[np.searchsorted(offsets, u.start, side="right") - 1])))
    return out


def test_a_stage_listing_the_domains_in_another_order_reads_on_not_again():
    """The permutation was seeded by the domain's place in the schedule: a stage whose
    schedule listed the domains in another order read the same positions of another
    permutation, reading documents again and skipping others."""
    offsets = {d: np.arange(0, 41) * 10 for d in ("code", "web")}  # 40 documents each
    first = MixtureSampler(MixtureSchedule({"web": 0.5, "code": 0.5}, 10_000), offsets,
                           max_chunk_tokens=10)
    second = MixtureSampler(MixtureSchedule({"code": 0.5, "web": 0.5}, 10_000), offsets,
                            max_chunk_tokens=10)
    read = _read(first, 40)
    second.continue_documents(first.document_positions())
    assert not set(read) & set(_read(second, 40))  # the rest of the epoch, each once


def test_the_next_stage_starts_at_the_first_token_not_handed_out():
    """The positions were the sampler's, past the chunk the last batch cut: up to a
    chunk per stage was skipped (a document's end, with its end-of-text, among them)."""
    offsets = {"a": np.array([0, 5000, 10_000])}
    corpus = TokenizedCorpus({"a": np.arange(10_000, dtype=np.uint32)}, offsets, eos_id=0,
                             vocab_size=10_000)
    schedule = MixtureSchedule({"a": 1.0}, 10_000)
    first = PackedLoader(corpus, schedule, seq_len=99, batch_size=1, max_chunk_tokens=1024)
    last = [b["input_ids"][0] for b in _batches(first, 3)][-1]
    second = PackedLoader(corpus, schedule, seq_len=99, batch_size=1, max_chunk_tokens=1024)
    second.continue_documents(first.document_positions(), first.shuffle)
    following = _batches(second, 1)[0]["input_ids"][0]
    assert int(following[0]) == int(last[-1]) + 1


def test_a_document_begun_before_its_domain_falls_to_share_zero_is_finished():
    """It was dropped mid-text, and the next unit, another domain's, followed it with no
    end-of-text between them."""
    weights = {"a": [[0, 0.5], [0.5, 0.0], [1, 0.0]], "b": [[0, 0.5], [0.5, 1.0], [1, 1.0]]}
    offsets = {"a": np.arange(0, 11) * 5000, "b": np.arange(0, 501) * 100}
    s = MixtureSampler(MixtureSchedule(weights, 40_000), offsets, max_chunk_tokens=256)
    units = []
    while s.tokens < 40_000:
        units.append(next(s))
    for unit, after in zip(units, units[1:]):
        if after.domain != unit.domain:  # a switch only at a document's end
            ends = offsets["ab"[unit.domain]]
            assert unit.start + unit.length in set(ends.tolist()), unit


def test_ranks_shares_hold_about_equal_tokens():
    """Documents were dealt out one by one: with uneven lengths a rank's share held 25%
    fewer tokens, and it began its next epoch while the other was reading this one."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6, 1.2, 201).astype(int), 1, 5000)
    offsets = {"a": np.concatenate([[0], np.cumsum(lengths)])}
    schedule = MixtureSchedule({"a": 1.0}, 10**6)
    shares = []
    for shard in (0, 1):
        s = MixtureSampler(schedule, offsets, shard=shard, n_shards=2)
        order = s._order(0, 0)
        shares.append(int(lengths[order].sum()))
    assert set(np.concatenate([MixtureSampler(schedule, offsets, shard=r, n_shards=2)._order(0, 0)
                               for r in (0, 1)]).tolist()) == set(range(201))
    assert abs(shares[0] - shares[1]) <= lengths.max()


@pytest.mark.parametrize("kwargs, message", [
    ({"max_chunk_tokens": 512.0}, r"max_chunk_tokens must be a whole number, got 512.0"),
    ({"seed": -1}, r"seed must be >= 0, got -1"),
    ({"shard": True}, r"shard must be a whole number, got True"),
])
def test_bad_sampler_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MixtureSampler(MixtureSchedule({"a": 1.0}, 100), {"a": np.array([0, 10])}, **kwargs)


def test_a_state_saved_before_the_shuffle_by_name_resumes_its_own_stream():
    """A run saved with the positional shuffle and chunk-counting cursor goes on as it
    started, not in the new permutations."""
    schedule = MixtureSchedule(RECIPE, total_tokens=200_000)
    offsets = synthetic_offsets(np.random.default_rng(2), RECIPE, docs=30)
    old = MixtureSampler(schedule, offsets, seed=1, max_chunk_tokens=256)
    old._set_shuffle("position")
    for _ in range(300):
        next(old)
    state = old.state_dict()
    del state["shuffle"], state["cursor_unit"]  # as saved then
    state["cursor"] = [[e, p, -(-read // 256)] for e, p, read in state["cursor"]]
    assert all(read % 256 == 0 for _, _, read in old.state_dict()["cursor"])
    resumed = MixtureSampler(schedule, offsets, seed=1, max_chunk_tokens=256)
    resumed.load_state_dict(state)
    assert resumed.shuffle == "position"
    assert [next(resumed) for _ in range(300)] == [next(old) for _ in range(300)]
