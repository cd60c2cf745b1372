"""What the trainer reads: the tokens ``dsv3 data prepare`` wrote, split into a
training part and a held-out part, served per stage by the data pipeline's
resumable ``PackedLoader`` under the stage's domain-mixture schedule.

The held-out part is each domain's last documents (whole documents, so no text is in
both): those ``dsv3 data prepare`` chose and never augmented (dsv3.data.heldout), or,
in data prepared before it chose them, the last ``val_fraction`` of them. Each stage
gets its own loader, with its own sequence length and a token budget of exactly what
the stage consumes. A stage
with a mixture of its own (``mixture_start``/``mixture_end``) runs that schedule from
its start to its end. The stages without one share the prepared ``mixture.json``
schedule: it runs once across them, start to end, over their tokens together (the
trainer hands each its part, see Trainer._spans_from), so a stage with its own
mixture between them pauses it rather than restarting it. mixture.json's
``max_chunk_tokens`` and ``seed`` shape every stage's stream; its ``total_tokens``
(the length of the schedule for a loader reading the prepared directory alone,
``PackedLoader.from_prepared``) does not: the trainer stretches the schedule over
the tokens its stages consume. Curriculum stages read rows at the final length and
use a prefix while the length warms up. Each stage reads on where the one before it
left each domain's documents (a stage's loader used to start again from the first
document, so every stage read the same ones), and each rank of a data-parallel run
reads its own share of every domain's documents (they used to read one shuffled
corpus each, in part the same documents).
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsv3.data.loader import PackedLoader
from dsv3.data.mixture import MixtureSchedule
from dsv3.data.movein import check_complete
from dsv3.data.tokenizer import TokenizedCorpus


# Tokens read from each domain for the data fingerprint: evenly spaced blocks, not the
# whole stream (a corpus may be terabytes; the offsets, read whole, change with almost
# any edit, the blocks catch same-length documents of other tokens).
FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK_TOKENS = 16, 1024


def _digest(*parts) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        raw = isinstance(part, (bytes, memoryview))
        h.update(part if raw else json.dumps(part, sort_keys=True).encode())
        h.update(b"\0")
    return h.hexdigest()


def _tokens_digest(corpus: TokenizedCorpus) -> str:
    """The token data's identity: vocabulary size, EOS, and per domain its document
    offsets and sampled token blocks. Not its location: a data directory moved or
    copied elsewhere is the same data."""
    parts = [corpus.vocab_size, corpus.eos_id]
    for domain in sorted(corpus.domains):
        tokens, n = corpus.tokens[domain], len(corpus.tokens[domain])
        starts = np.linspace(0, max(0, n - FINGERPRINT_BLOCK_TOKENS), FINGERPRINT_BLOCKS)
        blocks = [np.asarray(tokens[int(i):int(i) + FINGERPRINT_BLOCK_TOKENS], dtype=np.uint32)
                  for i in starts]
        # The offsets hashed where they lie (a memory map when read from disk): as bytes
        # (tobytes, as before: the same digest) they were a copy of them all in every rank.
        offsets = np.ascontiguousarray(corpus.offsets[domain], dtype=np.int64)
        parts += [domain, n, memoryview(offsets).cast("B"), np.concatenate(blocks).tobytes()]
    return _digest(*parts)


def data_fingerprint(corpus: TokenizedCorpus, tokenizer_path: Path | None, mixture: dict,
                     val_fraction: float) -> dict:
    """What identifies the data a run trains on, kept in its checkpoint (a resume on
    other data is refused, see checkpoint.data_changes): the tokenizer (its file's
    bytes), the token data, what of mixture.json the trainer reads (the weights, the
    loader seed, the chunk size: not ``total_tokens``, see stage_loader) and the
    held-out share (it decides which documents are trained on)."""
    tokenizer = _digest(Path(tokenizer_path).read_bytes()) if tokenizer_path else None
    used = {k: mixture.get(k) for k in ("weights", "seed", "max_chunk_tokens")}
    return {"tokenizer": tokenizer, "tokens": _tokens_digest(corpus), "mixture": _digest(used),
            "val_fraction": val_fraction}


def stage_mixture(stage, domains: list[str]) -> dict | None:
    """A stage's own [start, end] shares per domain, normalized (None: it follows the
    prepared mixture); a domain the data lacks is an error naming the stage."""
    if not (stage.mixture_start or stage.mixture_end):
        return None
    start, end = stage.mixture_start or stage.mixture_end, stage.mixture_end or stage.mixture_start
    unknown = sorted((set(start) | set(end)) - set(domains))
    if unknown:
        raise ValueError(f"stage {stage.name!r}: mixture names unknown domains {unknown}; "
                         f"the data has {domains}")
    weights = {d: [start.get(d, 0.0), end.get(d, 0.0)] for d in domains}
    totals = [sum(w[0] for w in weights.values()), sum(w[1] for w in weights.values())]
    return {d: [w[0] / totals[0], w[1] / totals[1]] for d, w in weights.items()}


def check_stage_mixtures(stages, domains: list[str]) -> None:
    """Every stage's mixture against the data's domains, before the first step: a
    typo in a later stage would otherwise surface only when it starts, after the
    earlier stages trained."""
    for stage in stages:
        stage_mixture(stage, domains)


def schedule_part(weights: dict, start: float, end: float) -> dict:
    """The part [start, end] of a mixture schedule (mixture.json's weight specs) as a
    schedule of its own over [0, 1]: the same shares at the same points of the part.
    The whole schedule is returned as it is."""
    if (start, end) == (0.0, 1.0):
        return weights
    whole = MixtureSchedule(weights, 1)
    if end <= start:  # no part left (a resumed run's later stage): the shares at its end
        row = whole.weights_at(end)
        return {domain: [[0.0, row[i]], [1.0, row[i]]] for i, domain in enumerate(whole.domains)}
    points = [start, *[b for b in whole.breakpoints if start < b < end], end]
    rows = [whole.weights_at(p) for p in points]
    return {domain: [[(p - start) / (end - start), row[i]] for p, row in zip(points, rows)]
            for i, domain in enumerate(whole.domains)}


DEFAULT_VAL_FRACTION = 0.05  # for data prepared before the split was made there


def resolve_val_fraction(corpus: TokenizedCorpus, val_fraction: float | None) -> float:
    """The held-out share a run uses: the prepared split's (data from ``dsv3 data
    prepare``, which chose the documents, see dsv3.data.heldout), where a setting
    other than it is an error rather than ignored; else the setting, by default 0.05."""
    if corpus.heldout is None:
        return DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    prepared = corpus.heldout["fraction"]
    if val_fraction is not None and val_fraction != prepared:
        raise ValueError(f"val_fraction = {val_fraction:g}: this data holds out its own "
                         f"documents, chosen when it was prepared ([heldout] fraction = "
                         f"{prepared:g} in its data config; they are never augmented): leave "
                         f"val_fraction unset, or prepare the data again with another "
                         f"[heldout] fraction")
    return prepared


def _split(corpus: TokenizedCorpus, val_fraction: float):
    """Per domain, its last documents held out: those the data was prepared with, or
    else ``val_fraction`` of them."""
    n_val = {}
    for domain in corpus.domains:
        n_docs = len(corpus.offsets[domain]) - 1
        if corpus.heldout is not None:  # checked at load to leave >= 1 to train on
            n_val[domain] = corpus.heldout["documents"][domain]
        else:
            n_val[domain] = max(1, round(val_fraction * n_docs)) if val_fraction > 0 else 0
        if n_docs - n_val[domain] < 1:
            raise ValueError(f"domain {domain!r} has {n_docs} document(s): too few to hold "
                             f"{n_val[domain]} out and train on the rest (val_fraction="
                             f"{val_fraction:g}; 0 holds none out, or give the domain more "
                             f"documents)")
    train = corpus.without_last(n_val)
    val = {d: torch.from_numpy(np.asarray(corpus.tokens[d][len(train.tokens[d]):],
                                          dtype=np.int64)) for d in corpus.domains}
    return train, val


@dataclass
class TrainData:
    train: TokenizedCorpus
    val: dict  # domain -> int64 [N] held-out token stream (documents end with EOS)
    default_weights: dict  # domain -> weight spec (mixture.json's)
    tokenizer_path: Path | None = None
    seed: int = 0
    max_chunk_tokens: int = 1024  # mixture.json's: the longest unit taken from one document
    fingerprint: dict | None = None  # data_fingerprint: what a resume checks
    val_fraction: float = DEFAULT_VAL_FRACTION  # the held-out share (resolve_val_fraction)

    @property
    def vocab_size(self) -> int:
        return self.train.vocab_size

    @property
    def domains(self) -> list[str]:
        return self.train.domains

    @classmethod
    def from_corpus(cls, corpus: TokenizedCorpus, weights: dict | None = None,
                    tokenizer_path: Path | None = None, val_fraction: float | None = None,
                    seed: int = 0, max_chunk_tokens: int = 1024) -> "TrainData":
        val_fraction = resolve_val_fraction(corpus, val_fraction)
        train, val = _split(corpus, val_fraction)
        if weights is None:  # the domains' natural token shares
            total = sum(int(o[-1]) for o in train.offsets.values())
            weights = {d: int(train.offsets[d][-1]) / total for d in train.domains}
        fingerprint = data_fingerprint(corpus, tokenizer_path, {
            "weights": weights, "seed": seed, "max_chunk_tokens": max_chunk_tokens}, val_fraction)
        return cls(train, val, weights, tokenizer_path, seed, max_chunk_tokens, fingerprint,
                   val_fraction)

    @classmethod
    def load(cls, data_dir: str | Path, val_fraction: float | None = None) -> "TrainData":
        data_dir = Path(data_dir)
        # before reading anything: mid-update, its tokens may be of another tokenizer
        check_complete(str(data_dir), "data_dir")
        if not (data_dir / "mixture.json").is_file():
            raise FileNotFoundError(f"data_dir: no mixture.json in {str(data_dir)!r}; run "
                                    f"`dsv3 data prepare` first (or point data_dir at its output)")
        mixture = json.loads((data_dir / "mixture.json").read_text())
        corpus = TokenizedCorpus.load(data_dir / "tokens")
        tokenizer = data_dir / "tokenizer.json"
        return cls.from_corpus(corpus, mixture["weights"],
                               tokenizer if tokenizer.is_file() else None, val_fraction,
                               mixture.get("seed", 0), mixture.get("max_chunk_tokens", 1024))

    def stage_loader(self, stage, n_batches: int, batch_size: int, rank: int = 0,
                     span: tuple[float, float] = (0.0, 1.0),
                     max_chunk_tokens: int | None = None, world: int = 1,
                     after: PackedLoader | None = None) -> PackedLoader:
        """The loader of one stage: ``n_batches`` batches of [batch_size, stage.seq_len + 1].
        A stage without a mixture of its own follows the part ``span`` of the prepared
        schedule (the trainer's share of it for this stage); units are at most
        ``max_chunk_tokens`` long (None: mixture.json's). Rank ``rank`` of ``world``
        reads its share of the documents; with ``after`` (the previous stage's loader)
        it reads on from where that one stopped."""
        weights = stage_mixture(stage, self.domains)
        if weights is None:
            weights = schedule_part(self.default_weights, *span)
        budget = n_batches * batch_size * (stage.seq_len + 1)
        loader = PackedLoader(self.train, MixtureSchedule(weights, max(1, budget)), stage.seq_len,
                              batch_size, seed=self.seed,
                              max_chunk_tokens=max_chunk_tokens or self.max_chunk_tokens,
                              shard=rank, n_shards=world)
        if after is not None:
            loader.continue_documents(after.document_positions(), after.shuffle)
        return loader


def preference_lengths(seq_len: int) -> tuple[int, int]:
    """(prompt_len, response_len) of a DPO stage's pairs: half its sequence each."""
    return seq_len // 2, seq_len - seq_len // 2


def _windows_per_document(offsets, length: int) -> np.ndarray:
    """Cumulative count over the documents of the windows of ``length`` tokens that
    fit inside one (0 for a shorter document)."""
    lengths = np.diff(np.asarray(offsets, dtype=np.int64))
    return np.cumsum(np.maximum(lengths - length + 1, 0))


def _usable_for_pairs(corpus: TokenizedCorpus, prompt_len: int, response_len: int) -> dict:
    """domain -> (cumulative prompt+response windows, cumulative response windows), for
    the domains that hold a pair: a document with a prompt and its continuation, and
    room for a rejected response that does not overlap it (2 x response_len - 1
    positions overlap at most)."""
    usable = {}
    for domain in sorted(corpus.domains):
        pairs = _windows_per_document(corpus.offsets[domain], prompt_len + response_len)
        responses = _windows_per_document(corpus.offsets[domain], response_len)
        if len(pairs) and pairs[-1] > 0 and responses[-1] >= 2 * response_len:
            usable[domain] = (pairs, responses)
    return usable


def check_preference_stages(stages, corpus: TokenizedCorpus) -> None:
    """Each DPO stage against the training documents, before the first step: data too
    short for its pairs would otherwise stop the run when the stage starts, after the
    earlier stages trained (and before their work was saved)."""
    for i, stage in enumerate(stages):
        if stage.kind != "dpo":
            continue
        prompt_len, response_len = preference_lengths(stage.seq_len)
        usable = _usable_for_pairs(corpus, prompt_len, response_len)
        if not usable:
            raise ValueError(f"stage {stage.name!r} (stages.{i}): no domain has a document of "
                             f"{prompt_len + response_len} tokens for a preference pair (a "
                             f"prompt of {prompt_len} and its continuation of {response_len}) "
                             f"and room for a rejected response; lower its seq_len or add data")
        # Its own mixture draws the pairs' domains: one weighing none of those with pairs,
        # at either end (the ends are reached: the shares move linearly between them),
        # failed when the stage came to draw.
        own = stage_mixture(stage, list(corpus.domains))
        for end, name in ((0, "mixture_start"), (1, "mixture_end")):
            if own is not None and not sum(own[d][end] for d in usable) > 0:
                setting = name if getattr(stage, name) else f"{name} (from the other end)"
                raise ValueError(f"stage {stage.name!r} (stages.{i}): its {setting} gives no "
                                 f"weight to a domain with preference pairs of its seq_len "
                                 f"({sorted(usable)})")


def _pair_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """One generator seed per (seed, step, micro-batch, rank), 63 bits: a product of them
    (the seed before) gave rank 257 the pairs of rank 0's next micro-batch."""
    digest = hashlib.blake2b(f"{seed}/{step}/{micro}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _draw(windows_cum: np.ndarray, offsets, gen: torch.Generator) -> int:
    """The start of a window drawn uniformly from all of a domain's windows."""
    r = int(torch.randint(int(windows_cum[-1]), (1,), generator=gen))
    document = int(np.searchsorted(windows_cum, r, side="right"))
    before = int(windows_cum[document - 1]) if document else 0
    return int(offsets[document]) + r - before


def preference_batch(corpus: TokenizedCorpus, batch: int, prompt_len: int, response_len: int,
                     *, seed: int, step: int, micro: int = 0, rank: int = 0,
                     weights: dict | None = None):
    """DPO pairs from ``corpus`` (the trainer passes the training split: the held-out
    documents are what the evaluation scores, so no stage may train on them). Returns
    (prompt_BP, chosen_BR, rejected_BR). The prompt and the chosen response are one
    document's text, the response its real continuation (a window across documents
    made the start of another one the "continuation"); the rejected one is the same
    length from elsewhere in the domain (fluent, but not what follows). A pair's domain
    is drawn by ``weights`` (domain -> share; None: in proportion to the domains' pair
    windows, their text), among the domains that hold pairs. Drawn from a generator
    seeded by (seed, step, micro, rank): a resumed run redraws them."""
    gen = torch.Generator().manual_seed(_pair_seed(seed, step, micro, rank))
    # counted once per corpus and pair shape, not at every micro-batch
    cache = corpus.__dict__.setdefault("_pair_windows", {})
    if (prompt_len, response_len) not in cache:
        cache[prompt_len, response_len] = _usable_for_pairs(corpus, prompt_len, response_len)
    usable = cache[prompt_len, response_len]
    if not usable:
        raise ValueError(f"no domain has a document of {prompt_len + response_len} tokens "
                         f"and room for a rejected response of {response_len}")
    domains = list(usable)
    if weights is None:
        shares = [float(usable[d][0][-1]) for d in domains]
    else:
        shares = [float(weights.get(d, 0.0)) for d in domains]
        if sum(shares) <= 0:
            raise ValueError(f"the mixture gives no weight to a domain with preference pairs "
                             f"({domains})")
    probabilities = torch.tensor(shares, dtype=torch.float64)

    def window(domain: str, start: int, length: int) -> torch.Tensor:
        # Only the window becomes int64: a domain's stream may be a large memory map.
        stream = corpus.tokens[domain]
        return torch.as_tensor(np.asarray(stream[start:start + length], dtype=np.int64))

    prompts, chosen, rejected = [], [], []
    for _ in range(batch):
        domain = domains[int(torch.multinomial(probabilities, 1, generator=gen))]
        pairs, responses = usable[domain]
        offsets = corpus.offsets[domain]
        start = _draw(pairs, offsets, gen)
        prompts.append(window(domain, start, prompt_len))
        chosen.append(window(domain, start + prompt_len, response_len))
        while True:  # a window that does not overlap the real continuation
            other = _draw(responses, offsets, gen)
            if abs(other - (start + prompt_len)) >= response_len:
                break
        rejected.append(window(domain, other, response_len))
    return torch.stack(prompts), torch.stack(chosen), torch.stack(rejected)
