"""dsv3.ops.route against reference.route at the edges of fp32's range: scores far
below the best (where the C++ kernel's fast exp hands over to std::exp) and groups whose
score overflows to -inf under a bias near -fp32's max."""
import pytest
import torch

from conftest import DEVICES, check_op
from dsv3 import ops, reference


# Logits spread wide: scores far below the best (an exp under 1e-38, where the C++
# kernel's fast exp hands over to std::exp; sigmoid of a logit under -87) still order
# the later picks, and a -inf logit scores 0. In fp32 and fp64 only: a bf16/fp16 case is
# checked against the fp64 reference, whose scores far below fp32's range differ where
# any fp32 kernel's are 0 and tie.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("score, with_bias, n_groups, topk_groups, K", [
    ("softmax", False, 1, 1, 16), ("sigmoid", False, 1, 1, 60), ("sigmoid", True, 8, 8, 60)])
def test_route_orders_scores_far_below_the_best(score, with_bias, n_groups, topk_groups, K,
                                                dtype, device):
    logits_TE = 60 * torch.randn(64, 64)
    logits_TE[::5, 7] = -float("inf")
    logits_TE = logits_TE.to(device=device, dtype=dtype)
    bias_E = 0.1 * torch.randn(64, device=device) if with_bias else None
    kwargs = dict(top_k=K, score=score, n_groups=n_groups, topk_groups=topk_groups,
                  normalize=False)
    (weights_TK, experts_TK, _), _ = check_op(
        lambda logits, bias: ops.route(logits, bias_E=bias, **kwargs),
        lambda logits, bias: reference.route(logits, bias_E=bias, **kwargs),
        [logits_TE, bias_E], differentiable=(0,))
    # Some picks are far below (else this checks nothing the other cases do not).
    far_below = weights_TK < 1e-38
    assert far_below.any() and (weights_TK[far_below] > 0).any()


@pytest.mark.parametrize("device", DEVICES)
def test_groups_scored_minus_inf_are_kept_in_order(device):
    # A bias near -fp32's max makes a group's top-2 sum -inf: groups 2 and 3 here. With 3
    # groups kept, the third is group 2 (the lower of the tied -inf groups), never a group
    # already kept a second time, and its experts tie (prob - 3e38 rounds to -3e38).
    bias_E = torch.zeros(16, device=device)
    bias_E[8:] = -3e38
    logits_TE = torch.randn(5, 16, device=device)
    kwargs = dict(top_k=10, score="sigmoid", n_groups=4, topk_groups=3, normalize=True)
    (_, experts_TK, counts_E), _ = check_op(
        lambda logits, bias: ops.route(logits, bias_E=bias, **kwargs),
        lambda logits, bias: reference.route(logits, bias_E=bias, **kwargs),
        [logits_TE, bias_E], differentiable=(0,))
    assert (experts_TK[:, 8:].sort(1).values.cpu() == torch.tensor([8, 9])).all()
