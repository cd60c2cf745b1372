"""Log-probabilities of target tokens under a language model: the one primitive that
perplexity, multiple choice, the bias probe and the lm-eval adapter are built on.

A model here is anything callable as ``model(tokens_BS) -> logits_BSV`` (a
``dsv3.model.Transformer`` or a test's fake); its context limit is read from
``model.config.max_seq_len`` when present. Sequences are batched with right padding:
the model is causal, so a pad after a sequence cannot change the logits of the tokens
before it, and the padded positions are never read. A capacity-limited MoE
(``capacity_factor`` set) would let pads and the other sequences of a batch compete for
expert slots, so every scoring and decoding call runs under ``evaluating``: eval mode
and dropless MoE layers for its duration, the model's own settings back afterwards
(``load_checkpoint`` builds a model dropless; one passed in directly, e.g. by a
trainer mid-run, may not be).
Log-softmax runs in fp32 and sums accumulate in fp64, so a score does not depend on
how the sequences were grouped into batches beyond fp32 rounding of the logits.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dsv3.moe import MoE  # the layer that reads capacity_factor

PAD_ID = 0  # any id works: padded positions are neither attended to by real ones nor read


def context_limit(model) -> int | None:
    """The most tokens the model takes in one forward (None: no limit known)."""
    return getattr(getattr(model, "config", None), "max_seq_len", None)


def context_cut(n_context: int, n_continuation: int, limit: int | None) -> int:
    """How many tokens ``score_continuations`` cuts from the left of a context so that
    context + continuation fits ``limit`` (the model reads all but the last token)."""
    return 0 if limit is None else max(0, n_context + n_continuation - 1 - limit)


def model_device(model) -> torch.device:
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")


@contextlib.contextmanager
def dropless(model):
    """The model's MoE layers without token dropping for the duration, then as they
    were, even on error. Each capacity-limited layer gets a dropless copy of its
    config, not an edit of the shared one: ``model.config`` keeps saying how the model
    was built (the factor the results report)."""
    modules = model.modules() if callable(getattr(model, "modules", None)) else ()
    swapped = [(m, m.config) for m in modules
               if isinstance(m, MoE) and m.config.capacity_factor is not None]
    try:
        for module, config in swapped:
            module.config = dataclasses.replace(config, capacity_factor=None)
        yield
    finally:
        for module, config in swapped:
            module.config = config


@contextlib.contextmanager
def evaluating(model):
    """Eval mode and ``dropless`` for the duration (a trainer may hand over a model
    mid-training: in train mode the MoE layers would count routing for the balance
    update), then back."""
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        with dropless(model):
            yield
    finally:
        if was_training:
            model.train()


@dataclass
class Scored:
    """Per-target log-probs (fp64) of one sequence and whether each target was the argmax."""
    logprobs: torch.Tensor
    greedy: torch.Tensor


def check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def score_sequences(model, sequences: list[list[int]], first_targets: list[int],
                    batch_size: int = 8, progress: bool = False,
                    desc: str = "scoring") -> list[Scored]:
    """For each sequence s, the log-prob of s[t] given s[:t] for t in [first_target, len(s)).

    The model reads s[:-1], so len(s) - 1 must fit its context. Sequences are sorted by
    length before batching (less padding); results come back in the input order.
    """
    check_batch_size(batch_size)
    if len(sequences) != len(first_targets):
        raise ValueError(f"first_targets: one per sequence expected ({len(sequences)}), "
                         f"got {len(first_targets)}")
    limit = context_limit(model)
    for i, (seq, first) in enumerate(zip(sequences, first_targets)):
        if not 1 <= first < len(seq):
            raise ValueError(f"first_targets[{i}]={first} must be in [1, len(sequence)="
                             f"{len(seq)}): every target needs at least one token before it")
        if limit is not None and len(seq) - 1 > limit:
            raise ValueError(f"sequences[{i}]: {len(seq) - 1} input tokens exceed the model's "
                             f"max_seq_len={limit}")
    device = model_device(model)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    results: list[Scored | None] = [None] * len(sequences)
    starts = range(0, len(order), batch_size)
    with evaluating(model):
        for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
            _score_batch(model, sequences, first_targets, order[start:start + batch_size],
                         device, results)
    return results


@torch.no_grad()
def _score_batch(model, sequences, first_targets, batch, device, results) -> None:
    width = len(sequences[batch[0]]) - 1  # the batch is sorted longest first
    tokens_BS = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
    for row, i in enumerate(batch):
        tokens_BS[row, :len(sequences[i]) - 1] = torch.tensor(sequences[i][:-1])
    logits_BSV = model(tokens_BS.to(device))
    # Only the scored positions' rows are normalised, one sequence at a time, on the
    # model's device, and only their targets' log-probs leave it: the whole batch's
    # fp32 log-softmax, copied to the host, was B*S*V*4 bytes twice (17 GB each at
    # S=4096, V=129,280, B=8)
    for row, i in enumerate(batch):
        seq = torch.tensor(sequences[i], device=device)
        positions = torch.arange(first_targets[i] - 1, len(seq) - 1, device=device)
        targets = seq[first_targets[i]:]
        rows_TV = logits_BSV[row, positions].float().log_softmax(-1)
        results[i] = Scored(rows_TV.gather(1, targets[:, None]).squeeze(1).double().cpu(),
                            (rows_TV.argmax(-1) == targets).cpu())


def score_continuations(model, requests: list[tuple[list[int], list[int]]],
                        batch_size: int = 8, progress: bool = False,
                        desc: str = "scoring") -> list[Scored]:
    """log p(continuation | context) token by token, for (context ids, continuation ids)
    pairs. A context that does not fit is cut from the left (the tokens nearest the
    continuation matter most); a continuation that alone does not fit is an error."""
    limit = context_limit(model)
    sequences, firsts = [], []
    for i, (context, continuation) in enumerate(requests):
        if not context:
            raise ValueError(f"requests[{i}]: the context is empty; prepend a start token (e.g. "
                             f"the eos id) so the first continuation token has a condition")
        if not continuation:
            raise ValueError(f"requests[{i}]: the continuation is empty")
        seq = list(context) + list(continuation)
        if limit is not None:
            if len(continuation) > limit:
                raise ValueError(f"requests[{i}]: the continuation has {len(continuation)} "
                                 f"tokens, more than max_seq_len={limit}")
            seq = seq[context_cut(len(context), len(continuation), limit):]
        sequences.append(seq)
        firsts.append(len(seq) - len(continuation))
    return score_sequences(model, sequences, firsts, batch_size, progress, desc)
