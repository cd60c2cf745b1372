"""Greedy and sampled decoding with ``dsv3.model.KVCache``.

One sequence at a time: prompts of different lengths would need a per-row position
offset and attention mask that the model's cache does not keep, and evaluation sets
are small. The prompt is run once to fill the cache; each new token then costs one
forward of one position. ``use_cache=False`` recomputes the whole sequence per token:
slow, kept because it is the check that the cached path is right.

The context is shared by the prompt and what is generated, and the generation budget
wins: with W = ``max_seq_len`` positions, a prompt keeps its last W - max_new_tokens + 1
tokens (the last new token is never read back, so every position is used) and
``Generation.prompt_cut`` says how many it lost, for callers to count. Keeping the
prompt whole instead would leave a long source one token to answer with, a failure the
scores would hide. ``max_new_tokens`` past W is refused: not even a one-token prompt
leaves room for them.

Sampling: logits / temperature, then top-k, then top-p (the smallest set of most
likely tokens whose probability reaches p; always at least one), drawn from a
``torch.Generator`` seeded per call, so a seed reproduces a sample exactly.
``temperature=0`` is greedy (argmax; ties go to the lowest id, as ``argmax`` does).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from dsv3.eval.scoring import context_limit, evaluating, model_device
from dsv3.model import KVCache


@dataclass
class Generation:
    tokens: list[int]  # generated ids, the eos id not included
    finish_reason: str  # "eos", "max_new_tokens" or "stop" (the caller's stop said so)
    prompt_cut: int = 0  # tokens dropped from the prompt's start so that max_new_tokens fit


def _check(max_new_tokens, temperature, top_k, top_p, limit) -> None:
    if (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
            or max_new_tokens < 0):
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if limit is not None and max_new_tokens > limit:
        raise ValueError(f"max_new_tokens must be <= the model's max_seq_len={limit} (what a "
                         f"one-token prompt leaves room for), got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def filter_logits(logits_V: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Logits with everything outside top-k / the top-p nucleus set to -inf."""
    logits_V = logits_V.clone()
    if top_k is not None and top_k < logits_V.numel():
        kth = logits_V.topk(top_k).values[-1]
        logits_V[logits_V < kth] = float("-inf")
    if top_p is not None and top_p < 1:
        sorted_V, order_V = logits_V.sort(descending=True)
        cumulative_V = sorted_V.softmax(-1).cumsum(-1)
        # Drop a token when the ones before it already reach p (the first always stays).
        drop_V = cumulative_V - sorted_V.softmax(-1) >= top_p
        logits_V[order_V[drop_V]] = float("-inf")
    return logits_V


def generate(model, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_id: int | None = None, use_cache: bool = True,
             stop: Callable[[list[int]], bool] | None = None) -> Generation:
    """Continue ``prompt`` (token ids) until ``eos_id``, ``max_new_tokens`` or ``stop``
    (called with the tokens generated so far after each new one: True ends it, e.g.
    once their text holds a stop string the caller cuts at, so that the tokens past it
    are not computed for nothing; the tokens before are the same either way). A prompt
    too long to leave room for ``max_new_tokens`` in the model's context loses its start
    (``prompt_cut`` counts the tokens lost; module docstring)."""
    limit = context_limit(model)
    _check(max_new_tokens, temperature, top_k, top_p, limit)
    if not prompt:
        raise ValueError("prompt must hold at least one token id (e.g. the eos id)")
    if max_new_tokens == 0:
        return Generation([], "max_new_tokens")
    # W - N + 1 prompt tokens, then N new ones: the N-th is never fed back.
    cut = 0 if limit is None else max(0, len(prompt) - (limit - max_new_tokens + 1))
    with evaluating(model):
        tokens, finish_reason = _decode(model, list(prompt)[cut:], max_new_tokens, temperature,
                                        top_k, top_p, seed, eos_id, use_cache, stop)
    return Generation(tokens, finish_reason, cut)


def stop_at_text(decode: Callable[[list[int]], str], stops: Iterable[str],
                 strip_leading: bool = False) -> Callable[[list[int]], bool] | None:
    """A ``stop`` for ``generate``: True once the text of the tokens so far (its leading
    whitespace stripped when ``strip_leading``, as a caller that strips it before cutting
    does) holds any of ``stops``, which the caller then cuts at: stopping there, as
    lm-eval's own models do, spares the tokens past it. None without a (non-empty) stop
    string. The text the caller cuts is then the same as after a full generation
    (unless one stop string overlaps another's occurrence: the cut comes at the first
    found). Each call decodes all the tokens so far: a few ms over a whole generation,
    against a model forward per token."""
    stops = [s for s in stops if s]
    if not stops:
        return None

    def stop(tokens: list[int]) -> bool:
        text = decode(tokens)
        text = text.lstrip() if strip_leading else text
        return any(s in text for s in stops)
    return stop


@torch.no_grad()
def _decode(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, eos_id,
            use_cache, stop) -> tuple[list[int], str]:
    # The prompt was cut to leave room: the sequence never outgrows the context (the
    # max_new_tokens-th token is returned before it would be fed back).
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    sequence, generated = list(prompt), []
    cache = KVCache() if use_cache else None
    logits_V = model(torch.tensor([sequence], device=device), kv_cache=cache)[0, -1] \
        if use_cache else None
    while True:
        if not use_cache:
            logits_V = model(torch.tensor([sequence], device=device))[0, -1]
        logits_V = logits_V.float().cpu()
        if temperature == 0:
            token = int(logits_V.argmax())
        else:
            probs_V = filter_logits(logits_V / temperature, top_k, top_p).softmax(-1)
            token = int(torch.multinomial(probs_V, 1, generator=generator))
        if token == eos_id:
            return generated, "eos"
        generated.append(token)
        sequence.append(token)
        if len(generated) == max_new_tokens:
            return generated, "max_new_tokens"
        if stop is not None and stop(generated):
            return generated, "stop"
        if use_cache:
            logits_V = model(torch.tensor([[token]], device=device), kv_cache=cache)[0, -1]
