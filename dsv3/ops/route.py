"""``dsv3::route``: fused top-k routing (softmax or sigmoid scores, optional
selection bias, group-limited selection, normalization and scale), with its fake
implementation for torch.compile and its autograd formula (weights are
differentiable w.r.t. the logits; expert ids and counts are not)."""
from typing import NamedTuple

import torch

from dsv3 import reference
from dsv3.ops.backend import use_reference
from dsv3.ops.checks import FLOAT_DTYPES, check_int, check_tensor, check_tokens

SCORES = ("softmax", "sigmoid")


class RouteOutput(NamedTuple):
    weights_TK: torch.Tensor  # fp32 (fp64 for fp64 logits)
    experts_TK: torch.Tensor  # int32, best first
    counts_E: torch.Tensor  # int32, copies routed to each expert


@torch.library.register_fake("dsv3::route")
def _route_fake(logits_TE, top_k, score, bias_E, n_groups, topk_groups, normalize, scale):
    n_tokens, n_experts = logits_TE.shape
    acc = torch.float64 if logits_TE.dtype == torch.float64 else torch.float32
    return (logits_TE.new_empty(n_tokens, top_k, dtype=acc),
            logits_TE.new_empty(n_tokens, top_k, dtype=torch.int32),
            logits_TE.new_empty(n_experts, dtype=torch.int32))


@torch.library.register_fake("dsv3::route_backward")
def _route_backward_fake(grad_weights_TK, logits_TE, experts_TK, score, normalize, scale):
    return torch.empty_like(logits_TE)


def _route_setup(ctx, inputs, output):
    logits_TE, _, score, _, _, _, normalize, scale = inputs
    ctx.save_for_backward(logits_TE, output[1])
    ctx.score, ctx.normalize, ctx.scale = score, normalize, scale


def _route_backward(ctx, grad_weights_TK, _grad_experts, _grad_counts):
    logits_TE, experts_TK = ctx.saved_tensors
    grad_logits_TE = None
    if grad_weights_TK is not None:
        grad_logits_TE = torch.ops.dsv3.route_backward(
            grad_weights_TK, logits_TE, experts_TK, ctx.score, ctx.normalize, ctx.scale)
    return grad_logits_TE, None, None, None, None, None, None, None


torch.library.register_autograd("dsv3::route", _route_backward, setup_context=_route_setup)


def route(logits_TE: torch.Tensor, top_k: int = 2, score: str = "softmax",
          bias_E: torch.Tensor | None = None, n_groups: int = 1, topk_groups: int = 1,
          normalize: bool = True, scale: float = 1.0) -> RouteOutput:
    """Select ``top_k`` experts per token from router logits [T, E].

    Softmax top-2 with normalization is Mixtral's router. DeepSeek-V3's is
    ``score="sigmoid"`` with ``bias_E`` (used only to choose experts, never in the
    weights), ``n_groups``/``topk_groups`` (experts are first restricted to the
    ``topk_groups`` groups whose two best scores sum highest) and ``scale``.
    Math runs in fp32 whatever the logits' dtype: bf16 scores tie and flip choices.
    """
    op = "route"
    check_tensor(op, "logits_TE", logits_TE, dim=2, dtypes=FLOAT_DTYPES)
    check_tokens(op, "logits_TE", logits_TE)
    n_experts = logits_TE.shape[1]
    if score not in SCORES:
        raise ValueError(f"{op}: score must be one of {SCORES}, got {score!r}")
    check_int(op, "n_groups", n_groups, low=1, high=n_experts)
    if n_experts % n_groups:
        raise ValueError(f"{op}: n_groups={n_groups} must divide the number of experts {n_experts}")
    check_int(op, "topk_groups", topk_groups, low=1, high=n_groups)
    check_int(op, "top_k", top_k, low=1, high=topk_groups * (n_experts // n_groups))
    if bias_E is not None:
        check_tensor(op, "bias_E", bias_E, dim=1, dtypes=FLOAT_DTYPES, like=logits_TE)
        if bias_E.shape[0] != n_experts:
            raise ValueError(f"{op}: bias_E must have shape [{n_experts}], got {tuple(bias_E.shape)}")
        bias_E = bias_E.detach()
    if use_reference(logits_TE):
        return RouteOutput(*reference.route(logits_TE, top_k, score, bias_E, n_groups, topk_groups,
                                            normalize, scale))
    return RouteOutput(*torch.ops.dsv3.route(logits_TE, top_k, score, bias_E, n_groups, topk_groups,
                                             normalize, float(scale)))
