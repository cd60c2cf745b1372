"""What the trainer reads: the tokens ``dsv3 data prepare`` wrote, split into a
training part and a held-out part, served per stage by the data pipeline's
resumable ``PackedLoader`` under the stage's domain-mixture schedule.

The held-out part is the last ``val_fraction`` of each domain's documents (whole
documents, so no text is in both). Each stage gets its own loader: its own
sequence length and mixture (the stage's ``mixture_start``/``mixture_end``, else the
prepared ``mixture.json`` schedule), with a token budget of exactly what the
stage consumes, so the mixture's schedule runs from the stage's start to its end.
Curriculum stages read rows at the final length and use a prefix while the
length warms up. A rank of a data-parallel run folds its rank into the seed.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsv3.data.loader import PackedLoader
from dsv3.data.mixture import MixtureSchedule
from dsv3.data.movein import check_complete
from dsv3.data.tokenizer import TokenizedCorpus


def _split(corpus: TokenizedCorpus, val_fraction: float):
    train_tokens, train_offsets, val = {}, {}, {}
    for domain in corpus.domains:
        offsets = corpus.offsets[domain]
        n_docs = len(offsets) - 1
        n_val = max(1, round(val_fraction * n_docs)) if val_fraction > 0 else 0
        if n_docs - n_val < 1:
            raise ValueError(f"domain {domain!r} has {n_docs} document(s): too few to hold "
                             f"{n_val} out (lower val_fraction)")
        cut = int(offsets[n_docs - n_val])
        train_tokens[domain] = corpus.tokens[domain][:cut]
        train_offsets[domain] = offsets[:n_docs - n_val + 1]
        val[domain] = torch.from_numpy(np.asarray(corpus.tokens[domain][cut:], dtype=np.int64))
    train = TokenizedCorpus(train_tokens, train_offsets, corpus.eos_id, corpus.vocab_size)
    return train, val


@dataclass
class TrainData:
    train: TokenizedCorpus
    val: dict  # domain -> int64 [N] held-out token stream (documents end with EOS)
    default_weights: dict  # domain -> weight spec (mixture.json's)
    tokenizer_path: Path | None = None
    seed: int = 0

    @property
    def vocab_size(self) -> int:
        return self.train.vocab_size

    @property
    def domains(self) -> list[str]:
        return self.train.domains

    @classmethod
    def from_corpus(cls, corpus: TokenizedCorpus, weights: dict | None = None,
                    tokenizer_path: Path | None = None, val_fraction: float = 0.05,
                    seed: int = 0) -> "TrainData":
        train, val = _split(corpus, val_fraction)
        if weights is None:  # the domains' natural token shares
            total = sum(int(o[-1]) for o in train.offsets.values())
            weights = {d: int(train.offsets[d][-1]) / total for d in train.domains}
        return cls(train, val, weights, tokenizer_path, seed)

    @classmethod
    def load(cls, data_dir: str | Path, val_fraction: float = 0.05) -> "TrainData":
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
                               mixture.get("seed", 0))

    def stage_loader(self, stage, n_batches: int, batch_size: int, rank: int = 0) -> PackedLoader:
        """The loader of one stage: ``n_batches`` batches of [batch_size, stage.seq_len + 1]."""
        if stage.mixture_start or stage.mixture_end:
            start, end = stage.mixture_start or stage.mixture_end, stage.mixture_end or stage.mixture_start
            unknown = sorted((set(start) | set(end)) - set(self.domains))
            if unknown:
                raise ValueError(f"stage {stage.name!r}: mixture names unknown domains {unknown}; "
                                 f"the data has {self.domains}")
            weights = {d: [start.get(d, 0.0), end.get(d, 0.0)] for d in self.domains}
            totals = [sum(w[0] for w in weights.values()), sum(w[1] for w in weights.values())]
            weights = {d: [w[0] / totals[0], w[1] / totals[1]] for d, w in weights.items()}
        else:
            weights = self.default_weights
        budget = n_batches * batch_size * (stage.seq_len + 1)
        return PackedLoader(self.train, MixtureSchedule(weights, max(1, budget)), stage.seq_len,
                            batch_size, seed=self.seed + 7919 * rank)


def preference_batch(streams: dict, batch: int, prompt_len: int, response_len: int, *,
                     seed: int, step: int, micro: int = 0, rank: int = 0):
    """DPO pairs from token streams (domain -> 1-D tokens; the trainer passes the
    training split's: the held-out documents are what the evaluation scores, so no
    stage may train on them). Returns (prompt_BP, chosen_BR, rejected_BR). The chosen
    response is the text's real continuation; the rejected one is the same length
    taken from elsewhere in the stream (fluent, but not what follows). Drawn from a
    generator seeded by (seed, step, micro, rank): a resumed run redraws them."""
    gen = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + micro) * 257 + rank)
    need = prompt_len + 2 * response_len
    usable = [s for _, s in sorted(streams.items()) if len(s) > need]
    if not usable:
        raise ValueError(f"no domain has more than {need} tokens for preference pairs")

    def window(stream, start: int, length: int) -> torch.Tensor:
        # Only the window becomes int64: a domain's stream may be a large memory map.
        return torch.as_tensor(np.asarray(stream[start:start + length], dtype=np.int64))

    prompts, chosen, rejected = [], [], []
    for _ in range(batch):
        stream = usable[int(torch.randint(len(usable), (1,), generator=gen))]
        start = int(torch.randint(len(stream) - prompt_len - response_len, (1,), generator=gen))
        prompts.append(window(stream, start, prompt_len))
        chosen.append(window(stream, start + prompt_len, response_len))
        while True:  # a window that does not overlap the real continuation
            other = int(torch.randint(len(stream) - response_len, (1,), generator=gen))
            if abs(other - (start + prompt_len)) >= response_len:
                break
        rejected.append(window(stream, other, response_len))
    return torch.stack(prompts), torch.stack(chosen), torch.stack(rejected)
