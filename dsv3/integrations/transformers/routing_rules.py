"""How each transformers MoE family's router reads into dsv3.MoE's routing fields
(MoEConfig's score, groups, scale, normalization), and the modes dsv3.MoE cannot
compute, refused with the setting and the reason. architectures.py's table refers to
these by family; its docstring says why each one reads as it does."""
import math

from torch import nn


def softmax_routing(router: nn.Module) -> dict:
    # Routers without norm_topk_prob (Mixtral, MiniMax, HunYuan, Qwen3-VL-MoE, Qwen3.5-MoE)
    # always renormalize.
    return {"score": "softmax", "normalize_weights": bool(getattr(router, "norm_topk_prob", True))}


def softmax_routing_always_normalized(router: nn.Module) -> dict:
    return {"score": "softmax", "normalize_weights": True}


def softmax_routing_never_normalized(router: nn.Module) -> dict:
    return {"score": "softmax", "normalize_weights": False}


def sigmoid_routing(router: nn.Module) -> dict:
    # Flint: renormalized iff norm_topk_prob; Laguna's router (no norm_topk_prob) always.
    return {"score": "sigmoid", "normalize_weights": bool(getattr(router, "norm_topk_prob", True))}


def hy_v3_routing(router: nn.Module) -> dict:
    return {"score": "sigmoid", "route_scale": float(router.router_scaling_factor),
            "normalize_weights": True}


def mistral4_routing(router: nn.Module) -> dict:
    # Mistral-Large-4's router has no norm_topk_prob: always renormalized.
    return {"score": "softmax", "n_groups": router.num_group, "topk_groups": router.topk_group,
            "group_score": "top2_sum", "route_scale": float(router.routed_scaling_factor),
            "normalize_weights": bool(getattr(router, "norm_topk_prob", True))}


def deepseek_routing(router: nn.Module) -> dict:
    return {"score": "sigmoid", "n_groups": router.num_group, "topk_groups": router.topk_group,
            "route_scale": float(router.routed_scaling_factor),
            "normalize_weights": bool(router.norm_topk_prob)}


def minimax_m2_routing(router: nn.Module) -> dict:
    return {"score": "sigmoid", "normalize_weights": True}  # no groups, no scale


def afmoe_routing(router: nn.Module) -> dict:
    return {"score": "sigmoid", "route_scale": float(router.route_scale), "normalize_weights": True}


def deepseek_v2_limits_groups(router: nn.Module) -> bool:
    """group_limited_greedy with some group left out (all kept: greedy)."""
    # A missing n_group counts as limiting, so that the refusal below names it (None ==
    # None would pass for "every group kept").
    return router.topk_method == "group_limited_greedy" and (
        router.num_group is None or router.topk_group != router.num_group)


def deepseek_v2_routing(router: nn.Module) -> dict:
    # Never renormalized: transformers' DeepseekV2TopkRouter ignores norm_topk_prob.
    routing = {"score": "softmax", "route_scale": float(router.routed_scaling_factor),
               "normalize_weights": False}
    if deepseek_v2_limits_groups(router):  # a group scored by its best expert
        routing |= {"n_groups": router.num_group, "topk_groups": router.topk_group,
                    "group_score": "max"}
    return routing


def deepseek_v2_refuse(block: nn.Module) -> tuple[str, str] | None:
    router = block.gate
    method = router.topk_method
    if method not in ("greedy", "group_limited_greedy"):
        return (f"topk_method={method!r}",
                "transformers computes only 'greedy' and 'group_limited_greedy'")
    if not deepseek_v2_limits_groups(router):
        return None
    n_group, topk_group, n_experts = router.num_group, router.topk_group, router.num_experts
    setting = f"topk_method={method!r} (n_group={n_group}, topk_group={topk_group})"
    if not (isinstance(n_group, int) and isinstance(topk_group, int) and 1 <= topk_group
            < n_group and n_experts % n_group == 0):
        return (setting, f"transformers' router cannot keep topk_group of n_group groups of "
                         f"its {n_experts} experts")
    return _top_k_past_kept_groups(router, setting)


def cohere2_moe_refuse(block: nn.Module) -> tuple[str, str] | None:
    selection = block.gate.expert_selection_fn
    if selection != "softmax":
        return (f"expert_selection_fn={selection!r}",
                "it picks the top-k logits, dsv3.MoE the top-k scores, and fp32 sigmoid maps "
                "plainly different large logits to the same score (1.0 above ~16.6), where "
                "dsv3.MoE picks the lower expert index")
    combination = block.shared_expert_combination_strategy
    if block.num_shared_experts > 0 and combination != "sum":
        return (f"shared_expert_combination_strategy={combination!r}",
                "it returns (routed + shared) / 2, dsv3.MoE routed + shared")
    return None


def ernie_refuse(block: nn.Module) -> tuple[str, str] | None:
    """ERNIE-4.5-MoE renormalizes by max(sum, moe_norm_min), dsv3.MoE by the sum (+1e-20,
    below the sum's ulp): the same while the chosen weights' sum is >= moe_norm_min. The
    experts are chosen on softmax + bias, so the sum has no floor of its own (a bias can
    choose experts of tiny probability). With R the bias' range (max - min) and
    moe_norm_min + R <= 1/(2E), every chosen expert is the most probable one (p >= 1/E)
    or one that outranks it, so p >= 1/E - R >= 1/(2E) + moe_norm_min: the sum is above
    both moe_norm_min and 1/(2E). R carries 2^-20 of the bias' magnitude on top, for
    the rounding of p + bias; the factor 2 is room for the softmax's."""
    router = block.gate
    norm_min = router.norm_min
    setting = f"moe_norm_min={norm_min!r}"
    if isinstance(norm_min, bool) or not isinstance(norm_min, (int, float)):
        return setting, "moe_norm_min is not a number"
    bias = router.moe_statics.e_score_correction_bias
    if bias.is_meta:
        return (setting + " and a selection bias on the meta device",
                "whether the clamp at moe_norm_min can act depends on the bias' values; "
                "convert the block once they are loaded")
    bias = bias.detach().float()
    spread = (bias.max() - bias.min()).item() + 2.0 ** -20 * max(1.0, bias.abs().max().item())
    bound = 1.0 / (2 * bias.numel())
    if not norm_min + spread <= bound:  # also false for a NaN norm_min or bias
        return (setting, f"transformers divides the chosen weights by moe_norm_min where their "
                         f"sum is smaller, dsv3.MoE by the sum; accepted while moe_norm_min + "
                         f"the selection bias' range is at most 1/(2 * num_experts) = "
                         f"{bound:.4g} (here {norm_min + spread:.4g}), which keeps the sum "
                         f"above moe_norm_min")
    return None


def axk2_routing(router: nn.Module) -> dict:
    # Without n_group (A.X-K2-Light) DeepSeek-V3's router without groups; every group kept is
    # the same (axk2_refuse takes nothing else).
    return {"score": "sigmoid", "route_scale": float(router.routed_scaling_factor),
            "normalize_weights": bool(router.norm_topk_prob)}


def axk2_refuse(block: nn.Module) -> tuple[str, str] | None:
    router = block.gate
    if router.num_group is None or router.topk_group == router.num_group:
        return None
    return (f"n_group={router.num_group}, topk_group={router.topk_group}",
            "it sets the left-out groups' selection scores (sigmoid + bias) to 0, which a "
            "kept expert's score + a negative bias falls below; dsv3.MoE never chooses them")


def mistral4_refuse(block: nn.Module) -> tuple[str, str] | None:
    """Mistral-4 scores a group by the sum of its two best softmax scores and sets the
    other groups' scores to 0 (not -inf) before its top-k: dsv3.MoE's group-limited
    softmax routing (group_score "top2_sum") while the top-k fits in the kept groups (a
    softmax score is > 0, so a kept expert outranks every zeroed one)."""
    router = block.gate
    n_group, topk_group, n_experts = router.num_group, router.topk_group, router.num_experts
    setting = f"n_group={n_group}, topk_group={topk_group}"
    if not (isinstance(n_group, int) and isinstance(topk_group, int) and 1 <= topk_group
            <= n_group and n_experts % n_group == 0 and n_experts // n_group >= 2):
        return (setting, f"transformers' router cannot keep topk_group of n_group groups of "
                         f"its {n_experts} experts scored by their two best")
    return _top_k_past_kept_groups(router, setting)


def laguna_refuse(block: nn.Module) -> tuple[str, str] | None:
    softcap = block.gate.router_logit_softcapping
    if softcap != 0.0:
        return (f"moe_router_logit_softcapping={softcap!r}",
                "it routes on tanh-softcapped logits; dsv3.MoE on the logits")
    scale = block.routed_scaling_factor
    if (isinstance(scale, bool) or not isinstance(scale, (int, float))
            or not math.isfinite(scale) or scale <= 0):
        # The scale multiplies the routed output: dsv3.MoE's route_scale, which is > 0.
        return (f"moe_routed_scaling_factor={scale!r}",
                "it scales the routed output by it, dsv3.MoE by a route_scale that is a "
                "finite number > 0")
    return None


def laguna_block_routing(block: nn.Module) -> dict:
    # (sum_k w_k expert_k(x)) * s, the block's: dsv3.MoE's route_scale s on the weights.
    return {"route_scale": float(block.routed_scaling_factor)}


def _top_k_past_kept_groups(router: nn.Module, setting: str) -> tuple[str, str] | None:
    """A group-limited router whose top_k exceeds the kept groups' experts: refused."""
    kept = router.topk_group * (router.num_experts // router.num_group)
    if router.top_k > kept:
        return (setting + f" with top_k={router.top_k}",
                "top_k is above the kept groups' experts, which transformers fills with other "
                "groups' experts at weight 0; dsv3.MoE chooses in the kept groups only")
    return None
