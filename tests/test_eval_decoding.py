"""dsv3.eval decoding: greedy and sampled decoding with the KV cache equal to
recomputing the whole sequence, seeds reproduce, top-k/top-p filters on a hand case,
stops at eos and where the caller's stop says, a prompt too long for the context loses its start so that
max_new_tokens fit (using every position), bad arguments."""
import math

import pytest
import torch

from dsv3.eval.decoding import filter_logits, generate, stop_at_text
from test_eval_support import tiny_model

PROMPT = [5, 17, 42, 7, 99]


def test_greedy_with_cache_equals_recomputing():
    model = tiny_model()
    cached = generate(model, PROMPT, max_new_tokens=12)
    full = generate(model, PROMPT, max_new_tokens=12, use_cache=False)
    assert len(cached.tokens) == 12 and cached.finish_reason == "max_new_tokens"
    assert cached.tokens == full.tokens


def test_sampling_is_seeded_and_cache_independent():
    model = tiny_model()
    kwargs = dict(max_new_tokens=10, temperature=1.5, top_p=0.95)
    first = generate(model, PROMPT, seed=3, **kwargs)
    assert generate(model, PROMPT, seed=3, **kwargs).tokens == first.tokens
    assert generate(model, PROMPT, seed=3, use_cache=False, **kwargs).tokens == first.tokens
    assert generate(model, PROMPT, seed=4, **kwargs).tokens != first.tokens


def test_top_k_one_is_greedy():
    model = tiny_model()
    greedy = generate(model, PROMPT, max_new_tokens=8)
    sampled = generate(model, PROMPT, max_new_tokens=8, temperature=2.0, top_k=1)
    assert sampled.tokens == greedy.tokens


def test_filters_on_a_hand_computed_case():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    probs = [math.exp(x) / sum(math.exp(y) for y in (3, 2, 1, 0)) for x in (3, 2, 1, 0)]
    assert probs[0] == pytest.approx(0.6439, abs=1e-4)  # so p=0.5 keeps only the first
    kept = lambda out: torch.isfinite(out).tolist()  # noqa: E731
    assert kept(filter_logits(logits, None, 0.5)) == [True, False, False, False]
    assert probs[0] + probs[1] == pytest.approx(0.8808, abs=1e-4)  # p=0.8 needs two
    assert kept(filter_logits(logits, None, 0.8)) == [True, True, False, False]
    assert kept(filter_logits(logits, 3, None)) == [True, True, True, False]
    assert kept(filter_logits(logits, 3, 0.8)) == [True, True, False, False]


def test_stops_at_eos():
    model = tiny_model(max_seq_len=32)
    first = generate(model, PROMPT, max_new_tokens=5).tokens
    stopped = generate(model, PROMPT, max_new_tokens=5, eos_id=first[1])
    assert (stopped.tokens, stopped.finish_reason) == (first[:1], "eos")


def test_stops_where_the_callers_stop_says():
    model = tiny_model(max_seq_len=32)
    first = generate(model, PROMPT, max_new_tokens=6).tokens
    seen = []
    stopped = generate(model, PROMPT, max_new_tokens=6,
                       stop=lambda tokens: seen.append(list(tokens)) or len(tokens) == 3)
    assert (stopped.tokens, stopped.finish_reason) == (first[:3], "stop")
    assert seen == [first[:1], first[:2], first[:3]]  # after each new token, no further


def test_stop_at_text_finds_a_stop_string_across_tokens():
    pieces = {1: " ", 2: "a", 3: "\n", 4: "b"}
    decode = lambda tokens: "".join(pieces[t] for t in tokens)  # noqa: E731
    stop = stop_at_text(decode, ["", "a\nb"])
    assert [stop([2]), stop([2, 3]), stop([2, 3, 4])] == [False, False, True]
    leading = stop_at_text(decode, ["\n"], strip_leading=True)
    assert [leading([3]), leading([1, 3]), leading([3, 2, 3])] == [False, False, True]
    assert stop_at_text(decode, ["", ""]) is None and stop_at_text(decode, []) is None


# With W = 32 positions and N new tokens, a prompt keeps its last W - N + 1 tokens: the
# N-th new token is never fed back, so every position is used. (A long prompt used to
# keep its last W tokens and get one new token, whatever N was.)
@pytest.mark.parametrize("prompt_tokens, max_new_tokens, cut", [
    (23, 10, 0),   # exactly W - N + 1 tokens: nothing cut
    (24, 10, 1),   # one more: its first token goes
    (32, 10, 9),   # a prompt that fills the context
    (40, 10, 17),  # longer than the context itself
    (40, 32, 39),  # N = W: a one-token prompt is left
    (40, 1, 8),    # N = 1: the prompt keeps the whole context
])
@pytest.mark.parametrize("use_cache", [True, False])
def test_a_long_prompt_loses_its_start_so_that_max_new_tokens_fit(prompt_tokens, max_new_tokens,
                                                                  cut, use_cache):
    model = tiny_model(max_seq_len=32)
    prompt = (PROMPT * 8)[:prompt_tokens]
    out = generate(model, prompt, max_new_tokens, use_cache=use_cache)
    assert (len(out.tokens), out.finish_reason, out.prompt_cut) == (
        max_new_tokens, "max_new_tokens", cut)
    kept = generate(model, prompt[cut:], max_new_tokens, use_cache=use_cache)
    assert kept.tokens == out.tokens and kept.prompt_cut == 0  # what the model saw


def test_more_new_tokens_than_the_context_holds_are_refused():
    """Past W even a one-token prompt leaves no room; W itself is the last that fits."""
    model = tiny_model(max_seq_len=32)
    with pytest.raises(ValueError, match=r"max_new_tokens must be <= the model's "
                                         r"max_seq_len=32 .*got 33"):
        generate(model, PROMPT, max_new_tokens=33)
    assert len(generate(model, PROMPT[:1], max_new_tokens=32).tokens) == 32


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_k=0), "top_k must be a positive int"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an int"),
])
def test_bad_arguments_name_themselves(kwargs, message):
    args = dict(max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(tiny_model(), PROMPT, **args)
