"""``dsv3::route``: fused top-k routing (softmax or sigmoid scores, optional
selection bias, group-limited selection with groups scored DeepSeek-V3's or
DeepSeek-V2's way, normalization and scale), with its fake implementation for
torch.compile and its autograd formula (weights and the balance-loss sums are
differentiable w.r.t. the logits; expert ids, counts and how they were chosen are
not). ``route_with_stats`` also returns, from the same pass over the logits,
the sums the load-balance and z losses need."""
from typing import NamedTuple

import torch

from dsv3 import reference
from dsv3.ops.backend import use_reference
from dsv3.ops.checks import (FLOAT_DTYPES, check_bool, check_int, check_no_forward_ad, check_number,
                              check_tensor, check_tokens, refuse_double_backward)

SCORES = ("softmax", "sigmoid")
# How group-limited routing scores a group: the sum of its two best selection scores
# (DeepSeek-V3) or its best one (DeepSeek-V2's topk_method="group_limited_greedy").
GROUP_SCORES = ("top2_sum", "max")


class RouteOutput(NamedTuple):
    weights_TK: torch.Tensor  # fp32 (fp64 for fp64 logits)
    experts_TK: torch.Tensor  # int32, best first
    counts_E: torch.Tensor  # int32, copies routed to each expert


class RouteStatsOutput(NamedTuple):
    weights_TK: torch.Tensor
    experts_TK: torch.Tensor
    counts_E: torch.Tensor
    score_sum_E: torch.Tensor  # sum over tokens of the row-normalized scores (differentiable)
    lse_sq_sum: torch.Tensor  # scalar: sum over tokens of logsumexp(logits)^2 (differentiable)


@torch.library.register_fake("dsv3::route")
def _route_fake(logits_TE, top_k, score, bias_E, n_groups, topk_groups, normalize, scale, stats,
                group_score="top2_sum"):
    n_tokens, n_experts = logits_TE.shape
    acc = torch.float64 if logits_TE.dtype == torch.float64 else torch.float32
    return (logits_TE.new_empty(n_tokens, top_k, dtype=acc),
            logits_TE.new_empty(n_tokens, top_k, dtype=torch.int32),
            logits_TE.new_empty(n_experts, dtype=torch.int32),
            logits_TE.new_empty(n_experts if stats else 0, dtype=acc),
            logits_TE.new_empty(() if stats else (0,), dtype=acc))


@torch.library.register_fake("dsv3::route_backward")
def _route_backward_fake(grad_weights_TK, grad_score_sum_E, grad_lse_sq_sum, logits_TE,
                         experts_TK, score, normalize, scale):
    return logits_TE.new_empty(logits_TE.shape)  # contiguous, as the kernels return it


def _route_setup(ctx, inputs, output):
    # The selection (bias, groups, group_score) enters only through the chosen experts,
    # saved: the gradient flows through the chosen scores and the sums alone.
    logits_TE, score, normalize, scale = inputs[0], inputs[2], inputs[6], inputs[7]
    ctx.save_for_backward(logits_TE, output[1])
    ctx.score, ctx.normalize, ctx.scale = score, normalize, scale
    ctx.n_inputs = len(inputs)  # group_score's default may be absent from a direct op call
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no work for it


def _route_backward(ctx, grad_weights_TK, _grad_experts, _grad_counts, grad_score_sum_E,
                    grad_lse_sq_sum):
    logits_TE, experts_TK = ctx.saved_tensors
    grads = [g if g is not None and g.numel() else None
             for g in (grad_weights_TK, grad_score_sum_E, grad_lse_sq_sum)]
    grad_logits_TE = None
    if any(g is not None for g in grads):
        grad_logits_TE = torch.ops.dsv3.route_backward(
            *grads, logits_TE, experts_TK, ctx.score, ctx.normalize, ctx.scale)
    return (grad_logits_TE, *[None] * (ctx.n_inputs - 1))


torch.library.register_autograd("dsv3::route", _route_backward, setup_context=_route_setup)
refuse_double_backward("dsv3::route_backward", "route")


def route(logits_TE: torch.Tensor, top_k: int = 2, score: str = "softmax",
          bias_E: torch.Tensor | None = None, n_groups: int = 1, topk_groups: int = 1,
          normalize: bool = True, scale: float = 1.0,
          group_score: str = "top2_sum") -> RouteOutput:
    """Select ``top_k`` experts per token from router logits [T, E].

    Softmax top-2 with normalization is Mixtral's router. DeepSeek-V3's is
    ``score="sigmoid"`` with ``bias_E`` (used only to choose experts, never in the
    weights), ``n_groups``/``topk_groups`` (experts are first restricted to the
    ``topk_groups`` best groups) and ``scale``. ``group_score`` says what makes a group
    best: ``"top2_sum"`` the sum of its two best selection scores (score + bias;
    DeepSeek-V3), ``"max"`` its single best one (DeepSeek-V2's group_limited_greedy).
    Ties, between groups as between experts, go to the lower index; the experts of the
    other groups are never chosen. Math runs in fp32 whatever the logits' dtype: bf16
    scores tie and flip choices.
    """
    return RouteOutput(*_route(logits_TE, top_k, score, bias_E, n_groups, topk_groups, normalize,
                               scale, group_score, stats=False)[:3])


def route_with_stats(logits_TE: torch.Tensor, top_k: int = 2, score: str = "softmax",
                     bias_E: torch.Tensor | None = None, n_groups: int = 1, topk_groups: int = 1,
                     normalize: bool = True, scale: float = 1.0,
                     group_score: str = "top2_sum") -> RouteStatsOutput:
    """``route`` plus, from the same read of the logits, ``score_sum_E`` (per expert,
    the sum over tokens of the scores normalized to sum to 1 per token: the Switch
    load-balance loss's mean probability times T) and ``lse_sq_sum`` (the sum over
    tokens of logsumexp(logits)^2: the ST-MoE z-loss times T). Both differentiable."""
    return RouteStatsOutput(*_route(logits_TE, top_k, score, bias_E, n_groups, topk_groups,
                                    normalize, scale, group_score, stats=True))


def _route(logits_TE, top_k, score, bias_E, n_groups, topk_groups, normalize, scale, group_score,
           stats):
    op = "route"
    check_tensor(op, "logits_TE", logits_TE, dim=2, dtypes=FLOAT_DTYPES)
    check_tokens(op, "logits_TE", logits_TE)
    n_experts = logits_TE.shape[1]
    if n_experts == 0:  # before the checks whose ranges it bounds (n_groups in [1, 0])
        raise ValueError(f"{op}: logits_TE must have a column per expert, at least one, got "
                         f"shape {tuple(logits_TE.shape)}")
    if score not in SCORES:
        raise ValueError(f"{op}: score must be one of {SCORES}, got {score!r}")
    check_int(op, "n_groups", n_groups, low=1, high=n_experts)
    if n_experts % n_groups:
        raise ValueError(f"{op}: n_groups={n_groups} must divide the number of experts {n_experts}")
    check_int(op, "topk_groups", topk_groups, low=1, high=n_groups)
    if not isinstance(group_score, str):
        raise TypeError(f"{op}: group_score must be a str, one of {GROUP_SCORES}, got "
                        f"{type(group_score).__name__} {group_score!r}")
    if group_score not in GROUP_SCORES:
        raise ValueError(f"{op}: group_score must be one of {GROUP_SCORES}, got {group_score!r}")
    check_int(op, "top_k", top_k, low=1, high=topk_groups * (n_experts // n_groups))
    check_bool(op, "normalize", normalize)
    check_number(op, "scale", scale)
    weight_dtype = torch.float64 if logits_TE.dtype == torch.float64 else torch.float32
    if not isinstance(scale, (torch.SymInt, torch.SymFloat)) \
            and abs(scale) > torch.finfo(weight_dtype).max:
        # The weights are computed in fp32 (fp64 for fp64 logits): past its range every
        # chosen expert's weight would be inf (and a zero weight NaN).
        raise ValueError(f"{op}: scale {scale} is past the range of the {weight_dtype} routing "
                         f"weights (max {torch.finfo(weight_dtype).max})")
    check_no_forward_ad(op, logits_TE)
    if bias_E is not None:
        check_tensor(op, "bias_E", bias_E, dim=1, dtypes=FLOAT_DTYPES, like=logits_TE)
        if bias_E.shape[0] != n_experts:
            raise ValueError(f"{op}: bias_E must have shape [{n_experts}], got {tuple(bias_E.shape)}")
        bias_E = bias_E.detach()
    if use_reference(logits_TE):
        outputs = reference.route(logits_TE, top_k, score, bias_E, n_groups, topk_groups,
                                  normalize, scale, group_score)
        return (*outputs, *reference.route_stats(logits_TE, score)) if stats else outputs
    return torch.ops.dsv3.route(logits_TE, top_k, score, bias_E, n_groups, topk_groups,
                                normalize, float(scale), stats, group_score)
