"""dsv3.eval perplexity: strided windows (each target once, the context each one gets,
checked against a hand-computed case), batched == one by one, agreement with a plain
full-sequence cross-entropy, token weighting across domains, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from dsv3.eval.perplexity import domain_perplexity, nll_by_domain, window_plan
from test_eval_support import UniformModel, codec, tiny_model


class PositionModel(UniformModel):
    """logit[0] = the position inside the window, all others 0: the NLL of a token 0
    reveals how much context it was predicted from."""

    def __call__(self, tokens_BS, kv_cache=None):
        logits_BSV = super().__call__(tokens_BS, kv_cache)
        logits_BSV[:, :, 0] = torch.arange(tokens_BS.shape[1], dtype=torch.float32)
        return logits_BSV


@pytest.mark.parametrize("n, window, stride", [
    (2, 4, 2),     # one target
    (10, 4, 2),    # several windows, the last one short
    (9, 4, 4),     # stride = window: disjoint windows
    (17, 5, 1),    # stride 1: every later target sees a full window
    (5, 16, 8),    # fits in one window
])
def test_window_plan_scores_each_target_once_with_enough_context(n, window, stride):
    plan = window_plan(n, window, stride)
    scored = [t for _, first, end in plan for t in range(first, end + 1)]
    assert scored == list(range(1, n))
    for k, (begin, first, end) in enumerate(plan):
        assert end - begin <= window  # the model reads ids[begin:end], at most `window` tokens
        if k > 0:
            assert first - begin >= window - stride + 1  # context of the first new target


def test_strided_windows_match_hand_computed_contexts():
    # 10 tokens, window 4, stride 2 -> windows [0..4] (targets 1-4 at positions 0-3),
    # [2..6] (targets 5,6 at 2,3), [4..8] (7,8 at 2,3), [5..9] (9 at 3).
    vocab = 5
    positions = [0, 1, 2, 3, 2, 3, 2, 3, 3]
    want = sum(-(p - math.log(math.exp(p) + vocab - 1)) for p in positions)
    totals = nll_by_domain(PositionModel(vocab), [("d", [0] * 10)], stride=2, window=4)
    assert totals["d"]["tokens"] == 9
    assert totals["d"]["nll"] == pytest.approx(want, rel=1e-6)


def test_batched_equals_one_by_one_and_full_forward():
    model = tiny_model(max_seq_len=16)
    gen = torch.Generator().manual_seed(1)
    lengths = [2, 5, 16, 17, 40, 9, 33]  # around and beyond the 16-token context
    docs = [("a" if i % 2 else "b", torch.randint(0, 300, (n,), generator=gen).tolist())
            for i, n in enumerate(lengths)]
    batched = nll_by_domain(model, docs, stride=8, batch_size=4)
    one_by_one = nll_by_domain(model, docs, stride=8, batch_size=1)
    for domain in ("a", "b"):
        assert batched[domain]["tokens"] == one_by_one[domain]["tokens"]
        assert batched[domain]["nll"] == pytest.approx(one_by_one[domain]["nll"], rel=1e-6)
    # Documents that fit in the context: the plain cross-entropy of one full forward.
    fitting = [d for d in docs if len(d[1]) <= 17]
    want = sum(F.cross_entropy(model(torch.tensor([ids[:-1]]))[0], torch.tensor(ids[1:]),
                               reduction="sum").item() for _, ids in fitting)
    got = nll_by_domain(model, fitting, stride=8, batch_size=3)
    assert sum(t["nll"] for t in got.values()) == pytest.approx(want, rel=1e-5)
    assert sum(t["tokens"] for t in got.values()) == sum(len(ids) - 1 for _, ids in fitting)


def test_uniform_model_has_perplexity_vocab_size_token_weighted():
    text_codec = codec()
    vocab = text_codec.vocab_size
    docs = [("prose", "the cat sat on the mat"), ("prose", "a dog"),
            ("code", "def add(a, b): return a + b\nimport os")]
    result = domain_perplexity(UniformModel(vocab, max_seq_len=8), text_codec, docs, stride=3)
    for domain in ("prose", "code", "all"):
        assert result[domain]["perplexity"] == pytest.approx(vocab, rel=1e-5)
    # The eos put before each document makes every text token a target.
    n_prose = sum(len(text_codec.encode(t)) for d, t in docs if d == "prose")
    assert result["prose"]["tokens"] == n_prose
    assert result["all"]["tokens"] == sum(len(text_codec.encode(t)) for _, t in docs)
    n_bytes = sum(len(t.encode()) for _, t in docs)
    assert result["all"]["bits_per_byte"] == pytest.approx(
        result["all"]["tokens"] * math.log2(vocab) / n_bytes, rel=1e-6)


def test_all_is_weighted_by_tokens_not_averaged_over_domains():
    model = tiny_model()
    text_codec = codec()
    docs = [("short", "a dog"), ("long", "the quick brown fox jumps over the lazy dog " * 2)]
    result = domain_perplexity(model, text_codec, docs)
    nll = sum(result[d]["nll_per_token"] * result[d]["tokens"] for d in ("short", "long"))
    tokens = result["short"]["tokens"] + result["long"]["tokens"]
    assert result["all"]["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-9)


class DivergedModel(UniformModel):
    """Sure of a token no text here has: every target costs about 1e4 nats."""

    def __call__(self, tokens_BS, kv_cache=None):
        logits_BSV = super().__call__(tokens_BS, kv_cache)
        logits_BSV[:, :, -1] = 1e4
        return logits_BSV


def test_a_diverged_model_has_an_infinite_perplexity_not_an_overflow():
    """exp(1e4) raised OverflowError, ending `dsv3 eval` with every task's results lost."""
    text_codec = codec()
    result = domain_perplexity(DivergedModel(text_codec.vocab_size), text_codec,
                               [("prose", "the cat sat on the mat")])
    assert result["prose"]["perplexity"] == math.inf
    assert result["prose"]["nll_per_token"] == pytest.approx(1e4, rel=1e-3)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="stride must be in"):
        window_plan(10, 4, 5)
    with pytest.raises(TypeError, match="documents must be a list of"):
        domain_perplexity(tiny_model(), codec(), ["just text"])
    with pytest.raises(ValueError, match="'all' is reserved"):
        domain_perplexity(tiny_model(), codec(), [("all", "text")])
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        nll_by_domain(tiny_model(), [("d", [1, 2, 3])], batch_size=0)


def test_a_training_model_is_scored_in_eval_mode_and_handed_back_training():
    from dsv3.moe import MoEConfig
    moe = MoEConfig(dim=32, ffn_dim=32, n_experts=4, top_k=2, bias_update_rate=1e-3)
    model = tiny_model(moe=moe)
    docs = [("d", list(range(1, 30)))]
    want = nll_by_domain(model, docs)["d"]["nll"]
    model.train()
    assert nll_by_domain(model, docs)["d"]["nll"] == pytest.approx(want, rel=1e-9)
    assert model.training
    # In train mode the MoE layers would have counted the routing for their bias update.
    assert all(layer.pending_counts.sum() == 0 for layer in model.moe_layers())
