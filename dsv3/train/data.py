"""What the trainer reads: token streams per domain (train and held-out splits)
and the batches it draws from them.

Sampling is stateless: the windows of optimizer step s, micro-batch m come from a
generator seeded by (seed, s, m), so a resumed run draws exactly the batches the
uninterrupted run would have, with no sampler state to save, and every rank of a
data-parallel run draws its own rows by also folding its rank into the seed.
Windows have a fixed length, so a domain's share of rows is its share of tokens.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class TokenData:
    vocab_size: int
    train: dict  # domain -> int64 [N] token stream (documents joined with EOS)
    val: dict  # domain -> int64 [N] held-out stream
    tokenizer_path: Path | None = None

    def __post_init__(self):
        if not self.train:
            raise ValueError("TokenData: train must hold at least one domain")
        for split in ("train", "val"):
            for domain, tokens in getattr(self, split).items():
                if tokens.dim() != 1 or tokens.dtype != torch.int64:
                    raise ValueError(f"TokenData: {split}[{domain!r}] must be a 1-D int64 tensor, "
                                     f"got {tokens.dtype} {tuple(tokens.shape)}")
                if tokens.numel() and int(tokens.max()) >= self.vocab_size:
                    raise ValueError(f"TokenData: {split}[{domain!r}] holds token id "
                                     f"{int(tokens.max())} >= vocab_size={self.vocab_size}")

    @property
    def domains(self) -> list[str]:
        return sorted(self.train)

    def natural_weights(self) -> dict:
        total = sum(t.numel() for t in self.train.values())
        return {d: self.train[d].numel() / total for d in self.domains}

    @classmethod
    def load(cls, data_dir: str | Path) -> "TokenData":
        """Read ``data_dir/meta.json`` (vocab size, domains) and the streams
        ``data_dir/tokens/<domain>.<split>.pt`` written by the data preparation."""
        data_dir = Path(data_dir)
        meta_path = data_dir / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: run `dsv3 data prepare` first "
                                    f"(or point data_dir at its output)")
        meta = json.loads(meta_path.read_text())
        splits = {split: {d: torch.load(data_dir / "tokens" / f"{d}.{split}.pt")
                          for d in meta["domains"]} for split in ("train", "val")}
        tokenizer = data_dir / "tokenizer.json"
        return cls(meta["vocab_size"], splits["train"], splits["val"],
                   tokenizer if tokenizer.is_file() else None)


def mixture_weights(data: TokenData, start: dict, end: dict, progress: float) -> dict:
    """Domain weights at ``progress`` in [0, 1] of a stage: linear from ``start`` to
    ``end`` (a missing side: the other; both missing: natural shares), normalized."""
    start, end = start or end, end or start
    if not start:
        return data.natural_weights()
    unknown = sorted((set(start) | set(end)) - set(data.domains))
    if unknown:
        raise ValueError(f"mixture names unknown domains {unknown}; the data has {data.domains}")
    raw = {d: (1 - progress) * start.get(d, 0.0) + progress * end.get(d, 0.0)
           for d in data.domains}
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"mixture weights sum to {total} at progress {progress:.2f}")
    return {d: w / total for d, w in raw.items()}


def _generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + micro) * 257 + rank)


def lm_batch(data: TokenData, weights: dict, batch: int, seq_len: int, *, seed: int, step: int,
             micro: int = 0, rank: int = 0):
    """(tokens [batch, seq_len + 1], domain of each row): windows drawn from the
    train streams, the domain of each row drawn by ``weights``."""
    gen = _generator(seed, step, micro, rank)
    domains = data.domains
    probs = torch.tensor([weights.get(d, 0.0) for d in domains], dtype=torch.float64)
    picks = torch.multinomial(probs, batch, replacement=True, generator=gen).tolist()
    rows, row_domains = [], []
    for pick in picks:
        stream = data.train[domains[pick]]
        if stream.numel() < seq_len + 1:
            raise ValueError(f"domain {domains[pick]!r} has {stream.numel()} train tokens, fewer "
                             f"than one window of {seq_len + 1}")
        start = int(torch.randint(stream.numel() - seq_len, (1,), generator=gen))
        rows.append(stream[start:start + seq_len + 1])
        row_domains.append(domains[pick])
    return torch.stack(rows), row_domains


def preference_batch(data: TokenData, batch: int, prompt_len: int, response_len: int, *,
                     seed: int, step: int, micro: int = 0, rank: int = 0):
    """DPO pairs from held-out text: (prompt_BP, chosen_BR, rejected_BR). The chosen
    response is the text's real continuation; the rejected one is the same length
    taken from another place of the held-out text (fluent, but not what follows)."""
    gen = _generator(seed + 7919, step, micro, rank)
    streams = [data.val[d] for d in data.domains if data.val[d].numel() > prompt_len + 2 * response_len]
    if not streams:
        raise ValueError(f"no held-out domain has more than {prompt_len + 2 * response_len} tokens "
                         f"for preference pairs")
    prompts, chosen, rejected = [], [], []
    for _ in range(batch):
        stream = streams[int(torch.randint(len(streams), (1,), generator=gen))]
        start = int(torch.randint(stream.numel() - prompt_len - response_len, (1,), generator=gen))
        prompts.append(stream[start:start + prompt_len])
        chosen.append(stream[start + prompt_len:start + prompt_len + response_len])
        # A window that does not overlap the real continuation.
        while True:
            other = int(torch.randint(stream.numel() - response_len, (1,), generator=gen))
            if abs(other - (start + prompt_len)) >= response_len:
                break
        rejected.append(stream[other:other + response_len])
    return torch.stack(prompts), torch.stack(chosen), torch.stack(rejected)
