"""float64 gradcheck of every op's autograd formula against finite differences
(independent of the reference: a formula shared by kernel and reference would
still be caught here)."""
import pytest
import torch
from torch.autograd import gradcheck

from conftest import make_experts
from dsv3 import ops

F64 = torch.float64


def f64(*shape):
    return torch.randn(*shape, dtype=F64, requires_grad=True)


@pytest.mark.parametrize(
    "K, score, with_bias, n_groups, topk_groups, normalize, scale, group_score", [
        (2, "softmax", False, 1, 1, True, 1.0, "top2_sum"),  # Mixtral: softmax, normalized
        (3, "softmax", False, 1, 1, False, 0.5, "top2_sum"),  # raw weights, scale != 1
        (8, "softmax", False, 1, 1, False, 1.0, "top2_sum"),  # K = E: every logit's gradient
        (2, "sigmoid", False, 1, 1, True, 2.5, "top2_sum"),  # sigmoid, normalized, scale != 1
        (3, "sigmoid", False, 1, 1, False, 1.0, "top2_sum"),  # sigmoid, raw weights
        (4, "sigmoid", True, 4, 2, True, 2.5, "top2_sum"),  # DeepSeek-V3: bias + groups
        # DeepSeek-V2's group_limited_greedy: groups by their best score, raw weights, scaled
        (3, "softmax", False, 4, 2, False, 1.5, "max"),
        (4, "sigmoid", True, 4, 2, True, 2.5, "max"),  # groups by their best, with a bias
    ])
def test_route_gradcheck(K, score, with_bias, n_groups, topk_groups, normalize, scale,
                         group_score):
    bias_E = 0.1 * torch.randn(8, dtype=F64) if with_bias else None
    assert gradcheck(lambda logits: ops.route(logits, K, score, bias_E, n_groups, topk_groups,
                                              normalize, scale, group_score).weights_TK,
                     (2 * f64(6, 8),))


@pytest.mark.parametrize("score, with_bias, n_groups, topk_groups, group_score", [
    ("softmax", False, 1, 1, "top2_sum"),  # Mixtral-style router
    ("sigmoid", True, 4, 2, "top2_sum"),  # DeepSeek-V3-style router
    ("softmax", False, 4, 2, "max"),  # DeepSeek-V2-style router (group_limited_greedy)
])
def test_route_with_stats_gradcheck(score, with_bias, n_groups, topk_groups, group_score):
    """Weights and both balance-loss sums, differentiated together."""
    bias_E = 0.1 * torch.randn(8, dtype=F64) if with_bias else None
    assert gradcheck(lambda logits: tuple(ops.route_with_stats(
        logits, 3, score, bias_E, n_groups, topk_groups, True, 2.5, group_score)[i]
        for i in (0, 3, 4)), (2 * f64(6, 8),))


@pytest.mark.parametrize("pattern", [
    "random",  # plain permutation
    "one_expert",  # all copies in one segment
    "dropped",  # dropped copies still carry x forward (and its gradient back)
])
def test_permute_gradcheck(pattern):
    experts_TK = make_experts(7, 5, 2, pattern)
    assert gradcheck(lambda x: ops.permute(x, experts_TK, 5).x_SD, (f64(7, 3),))


@pytest.mark.parametrize("with_weights", [True, False])
def test_unpermute_gradcheck(with_weights):
    _, row_map_TK = ops.expert_index(make_experts(7, 5, 3), 5)
    inputs = (f64(21, 4), torch.rand(7, 3, dtype=F64, requires_grad=True)) if with_weights \
        else (f64(21, 4),)
    assert gradcheck(lambda *a: ops.unpermute(a[0], row_map_TK, *a[1:]), inputs)


@pytest.mark.parametrize("layout", ["EXY", "EYX_T"])
@pytest.mark.parametrize("ends", [
    (3, 7, 12),  # every expert busy, no tail
    (0, 5, 5),  # empty first and last experts
    (2, 2, 9),  # empty middle expert and a 3-row dropped tail
])
def test_grouped_mm_gradcheck(layout, ends):
    w_EXY = f64(3, 4, 5) if layout == "EXY" else f64(3, 5, 4).detach().transpose(1, 2)
    w_EXY.requires_grad_()
    offsets_E = torch.tensor(ends, dtype=torch.int32)
    assert gradcheck(lambda x, w: ops.grouped_mm(x, w, offsets_E), (f64(12, 4), w_EXY))


def test_swiglu_gradcheck():
    assert gradcheck(ops.swiglu, (3 * f64(9, 10),))


@pytest.mark.parametrize("alpha, limit", [(1.702, None), (-0.7, 2.0)])
def test_gpt_oss_glu_gradcheck(alpha, limit):
    assert gradcheck(lambda h: ops.gpt_oss_glu(h, alpha, limit), (3 * f64(9, 10),))
