"""Held-out perplexity per domain: token-weighted, exact, batched.

Exact means the reported number is exp(total NLL / total predicted tokens) over every
token of every document of a domain (not a mean of per-document or per-batch
perplexities), with each token predicted exactly once. When the tokenizer has an
end-of-text id it is put before each document, so the first token is predicted too.

Documents longer than the model's context are cut into **strided sliding windows**:
window k covers the tokens [b_k, e_k] with e_k = min(W + k*S, n - 1) and
b_k = max(0, e_k - W), and scores only the targets that earlier windows did not, so
after the first window every target sees at least W - S + 1 tokens of context
(W = window = max_seq_len, S = stride, default W // 2). Smaller strides give more
context per token at the cost of more forwards (S = 1: every target sees W tokens).
The windows of all documents are batched together (see ``scoring``).
"""
from __future__ import annotations

import math

from dsv3.eval.scoring import context_limit, score_sequences


def window_plan(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first scored target, end) per window over a sequence of n_tokens ids:
    the window is ids[begin:end + 1] and scores the targets first..end (inclusive)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    plan, scored_until, k = [], 0, 0
    while scored_until < n_tokens - 1:
        end = min(window + k * stride, n_tokens - 1)
        begin = max(0, end - window)
        plan.append((begin, scored_until + 1, end))
        scored_until, k = end, k + 1
    return plan


def nll_by_domain(model, token_documents: list[tuple[str, list[int]]], stride: int | None = None,
                  batch_size: int = 8, window: int | None = None, progress: bool = False
                  ) -> dict[str, dict]:
    """{domain: {"nll": summed NLL in nats, "tokens": targets, "documents": n}} over
    documents given as (domain, token ids); a document of fewer than 2 ids has no target
    and is counted in "skipped"."""
    window = window or context_limit(model)
    if window is None:
        raise ValueError("window: the model has no config.max_seq_len; pass window=")
    stride = stride or max(1, window // 2)
    sequences, firsts, owners = [], [], []
    totals: dict[str, dict] = {}
    for domain, ids in token_documents:
        entry = totals.setdefault(domain, {"nll": 0.0, "tokens": 0, "documents": 0, "skipped": 0})
        if len(ids) < 2:
            entry["skipped"] += 1
            continue
        entry["documents"] += 1
        for begin, first, end in window_plan(len(ids), window, stride):
            sequences.append(list(ids[begin:end + 1]))
            firsts.append(first - begin)
            owners.append(domain)
    scored = score_sequences(model, sequences, firsts, batch_size, progress, desc="perplexity")
    for domain, result in zip(owners, scored):
        totals[domain]["nll"] += -result.logprobs.sum().item()
        totals[domain]["tokens"] += result.logprobs.numel()
    return totals


def perplexity_of(mean_nll: float) -> float:
    """exp(mean NLL per token); inf past float range: a diverged model's NLL above
    ~709.8 per token raised OverflowError, which lost the run's log (training) or every
    task's results (``dsv3 eval``)."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


def _summary(nll: float, tokens: int, n_bytes: int) -> dict:
    return {"perplexity": perplexity_of(nll / tokens) if tokens else float("nan"),
            "nll_per_token": nll / tokens if tokens else float("nan"),
            # Bits per UTF-8 byte: comparable across tokenizers, unlike perplexity.
            "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else float("nan"),
            "tokens": tokens, "bytes": n_bytes}


def check_documents(documents: list[tuple[str, str]]) -> None:
    """What ``domain_perplexity`` needs of its documents, checkable before a model exists."""
    if not isinstance(documents, list) or not all(
            isinstance(d, tuple) and len(d) == 2 for d in documents):
        raise TypeError("documents must be a list of (domain, text) tuples")
    if any(domain == "all" for domain, _ in documents):
        raise ValueError("documents: 'all' is reserved for the total over domains; rename it")


def domain_perplexity(model, codec, documents: list[tuple[str, str]], stride: int | None = None,
                      batch_size: int = 8, progress: bool = False) -> dict[str, dict]:
    """Perplexity per domain of (domain, text) documents, plus "all" (every token of
    every domain, token-weighted)."""
    check_documents(documents)
    prefix = [codec.eos_id] if codec.eos_id is not None else []
    token_documents = [(domain, prefix + codec.encode(text)) for domain, text in documents]
    totals = nll_by_domain(model, token_documents, stride, batch_size, progress=progress)
    n_bytes: dict[str, int] = {}
    for (domain, text), (_, ids) in zip(documents, token_documents):
        if len(ids) >= 2:  # only documents with a predicted token count toward bits/byte
            n_bytes[domain] = n_bytes.get(domain, 0) + len(text.encode("utf-8"))
    n_bytes = {domain: n_bytes.get(domain, 0) for domain in totals}
    out = {d: {**_summary(t["nll"], t["tokens"], n_bytes[d]), "documents": t["documents"],
               "skipped": t["skipped"]} for d, t in sorted(totals.items())}
    out["all"] = {**_summary(sum(t["nll"] for t in totals.values()),
                             sum(t["tokens"] for t in totals.values()), sum(n_bytes.values())),
                  "documents": sum(t["documents"] for t in totals.values()),
                  "skipped": sum(t["skipped"] for t in totals.values())}
    return out
