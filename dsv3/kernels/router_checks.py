"""The router launchers' argument checks: those of the C++ kernels (csrc/cpu/route.cpp),
which a direct torch.ops call meets without ops.route's. Kept apart from the kernels
(dsv3/kernels/router.py) and free of triton."""
import torch


def check_route(logits_TE, top_k, bias_E, n_groups, topk_groups) -> None:
    """The C++ kernel's checks (csrc/cpu/route.cpp), which a direct torch.ops call meets
    without ops.route's: the kernel reads bias_E for every expert, and its tiles and
    slots are sized by the others."""
    if logits_TE.dim() != 2:
        raise ValueError("route: logits_TE must be 2-D [T, E]")
    n_experts = logits_TE.shape[1]
    if n_groups < 1 or n_experts % n_groups:
        raise ValueError("route: n_groups must divide n_experts")
    if not 1 <= topk_groups <= n_groups:
        raise ValueError("route: topk_groups must be in [1, n_groups]")
    if not 1 <= top_k <= topk_groups * (n_experts // n_groups):
        raise ValueError("route: top_k must be in [1, experts in the selected groups]")
    if bias_E is not None and tuple(bias_E.shape) != (n_experts,):
        raise ValueError(f"route: bias_E must be 1-D [E={n_experts}], got {tuple(bias_E.shape)}")


def check_route_backward(grad_weights_TK, grad_score_sum_E, grad_lse_sq_sum, logits_TE,
                         experts_TK) -> None:
    """The C++ kernel's shape checks (its id check is the kernel's flag here)."""
    if logits_TE.dim() != 2:
        raise ValueError(f"route_backward: logits_TE must be 2-D [T, E], got "
                         f"{tuple(logits_TE.shape)}")
    n_tokens, n_experts = logits_TE.shape
    if experts_TK.dim() != 2 or experts_TK.shape[0] != n_tokens or experts_TK.dtype != torch.int32:
        raise ValueError(f"route_backward: experts_TK must be int32 [T={n_tokens}, K], got "
                         f"{experts_TK.dtype} {tuple(experts_TK.shape)}")
    if grad_weights_TK is not None and grad_weights_TK.shape != experts_TK.shape:
        raise ValueError(f"route_backward: grad_weights_TK must have experts_TK's shape "
                         f"{tuple(experts_TK.shape)}, got {tuple(grad_weights_TK.shape)}")
    if grad_score_sum_E is not None and tuple(grad_score_sum_E.shape) != (n_experts,):
        raise ValueError(f"route_backward: grad_score_sum_E must be 1-D [E={n_experts}], got "
                         f"{tuple(grad_score_sum_E.shape)}")
    if grad_lse_sq_sum is not None and grad_lse_sq_sum.numel() != 1:
        raise ValueError(f"route_backward: grad_lse_sq_sum must have one element, got "
                         f"{tuple(grad_lse_sq_sum.shape)}")
