"""Triton fused router: one pass over a block of tokens' logits computes the
scores (softmax or sigmoid, fp32), the group-limited top-k selection with the
selection-only bias, the normalized and scaled weights, the per-expert counts
(integer atomics: exact and order-independent) and a NaN flag, so the logits are
read once. The backward recomputes the scores from the logits instead of saving
the [T, E] probabilities.

Ties go to the lower expert index (``tl.argmax(..., tie_break_left=True)``), as in
the CPU kernel and the reference.
"""
import torch
import triton
import triton.language as tl

from dsv3.kernels.config import INTERPRET

_BLOCK_T = 16 if INTERPRET else 32


@triton.jit
def _scores(logits_ptr, stride_t, tokens, cols, n_tokens, n_experts, SIGMOID: tl.constexpr):
    mask = (tokens[:, None] < n_tokens) & (cols[None, :] < n_experts)
    logits = tl.load(logits_ptr + tokens[:, None].to(tl.int64) * stride_t + cols[None, :],
                     mask=mask, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        probs = tl.where(mask, 1.0 / (1.0 + tl.exp(-logits)), 0.0)
    else:
        row_max = tl.max(logits, 1)
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        exps = tl.where(mask, tl.exp(logits - row_max[:, None]), 0.0)
        total = tl.sum(exps, 1)
        probs = exps / tl.where(total > 0, total, 1.0)[:, None]  # rows past the end: all zero
    return logits, probs


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, weights_ptr, experts_ptr, counts_ptr, nan_ptr,
                  n_tokens, n_experts, stride_t, top_k, n_groups, topk_groups, scale,
                  SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_G: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    token_mask = tokens < n_tokens
    logits, probs = _scores(logits_ptr, stride_t, tokens, cols, n_tokens, n_experts, SIGMOID)
    has_nan = tl.sum(tl.where((logits != logits) | (logits == float("inf")), 1, 0), 1)
    tl.atomic_max(nan_ptr, tl.max(has_nan, 0))

    choice = tl.where(cols[None, :] < n_experts, probs, float("-inf"))
    if HAS_BIAS:
        choice += tl.load(bias_ptr + cols, mask=cols < n_experts, other=0.0).to(tl.float32)[None, :]
    if n_groups > 1:
        # Group score: the sum of the group's two best choice scores (DeepSeek-V3).
        group_size = n_experts // n_groups
        group_of_col = cols // group_size
        group_ids = tl.arange(0, BLOCK_G)
        group_scores = tl.full((BLOCK_T, BLOCK_G), float("-inf"), tl.float32)
        for g in range(n_groups):
            in_group = (group_of_col == g)[None, :]
            masked = tl.where(in_group, choice, float("-inf"))
            best = tl.argmax(masked, 1, tie_break_left=True)
            first = tl.max(masked, 1)
            second = tl.max(tl.where(cols[None, :] == best[:, None], float("-inf"), masked), 1)
            score = tl.where(group_size > 1, first + second, first)
            group_scores = tl.where(group_ids[None, :] == g, score[:, None], group_scores)
        keep = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
        for _ in range(topk_groups):
            g_best = tl.argmax(group_scores, 1, tie_break_left=True)
            keep = keep | (group_of_col[None, :] == g_best[:, None])
            group_scores = tl.where(group_ids[None, :] == g_best[:, None], float("-inf"), group_scores)
        choice = tl.where(keep, choice, float("-inf"))

    slots = tl.arange(0, BLOCK_K)
    chosen = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    weights = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for k in range(top_k):
        expert = tl.argmax(choice, 1, tie_break_left=True)
        is_expert = cols[None, :] == expert[:, None]
        weight = tl.sum(tl.where(is_expert, probs, 0.0), 1)
        chosen = tl.where(slots[None, :] == k, expert[:, None], chosen)
        weights = tl.where(slots[None, :] == k, weight[:, None], weights)
        choice = tl.where(is_expert, float("-inf"), choice)
        tl.atomic_add(counts_ptr + expert, 1, mask=token_mask)
    if NORMALIZE:
        weights = weights / (tl.sum(weights, 1)[:, None] + 1e-20)
    weights = weights * scale
    out_mask = token_mask[:, None] & (slots[None, :] < top_k)
    out_offsets = tokens[:, None].to(tl.int64) * top_k + slots[None, :]
    tl.store(weights_ptr + out_offsets, weights, mask=out_mask)
    tl.store(experts_ptr + out_offsets, chosen, mask=out_mask)


@triton.jit
def _route_backward_kernel(grad_w_ptr, logits_ptr, experts_ptr, grad_logits_ptr, n_tokens,
                           n_experts, stride_t, top_k, scale, SIGMOID: tl.constexpr,
                           NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    # With p the scores, s the sum of the chosen ones and g = dL/dw: normalized
    # weights give dL/dp_k = scale / s * (g_k - sum_j g_j p_j / s), else scale * g_k;
    # softmax: dL/dl_e = p_e (dL/dp_e - sum_k dL/dp_k p_k); sigmoid: dL/dp_e p_e (1 - p_e).
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, BLOCK_K)
    _, probs = _scores(logits_ptr, stride_t, tokens, cols, n_tokens, n_experts, SIGMOID)
    slot_mask = (tokens[:, None] < n_tokens) & (slots[None, :] < top_k)
    slot_offsets = tokens[:, None].to(tl.int64) * top_k + slots[None, :]
    chosen = tl.load(experts_ptr + slot_offsets, mask=slot_mask, other=-1)
    grad_w = tl.load(grad_w_ptr + slot_offsets, mask=slot_mask, other=0.0).to(tl.float32)
    chosen_p = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for k in range(top_k):
        expert_k = tl.sum(tl.where(slots[None, :] == k, chosen, 0), 1)
        p_k = tl.sum(tl.where(cols[None, :] == expert_k[:, None], probs, 0.0), 1)
        chosen_p = tl.where(slots[None, :] == k, p_k[:, None], chosen_p)
    if NORMALIZE:
        total = tl.sum(chosen_p, 1) + 1e-20
        g_dot_p = tl.sum(grad_w * chosen_p, 1)
        grad_p = scale / total[:, None] * (grad_w - (g_dot_p / total)[:, None])
    else:
        grad_p = scale * grad_w
    grad_p_full = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k in range(top_k):
        expert_k = tl.sum(tl.where(slots[None, :] == k, chosen, 0), 1)
        grad_k = tl.sum(tl.where(slots[None, :] == k, grad_p, 0.0), 1)
        grad_p_full = tl.where(cols[None, :] == expert_k[:, None], grad_k[:, None], grad_p_full)
    if SIGMOID:
        grad_logits = grad_p_full * probs * (1.0 - probs)
    else:
        grad_logits = probs * (grad_p_full - tl.sum(grad_p * chosen_p, 1)[:, None])
    mask = (tokens[:, None] < n_tokens) & (cols[None, :] < n_experts)
    tl.store(grad_logits_ptr + tokens[:, None].to(tl.int64) * n_experts + cols[None, :],
             grad_logits.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def _blocks(n_experts: int, top_k: int, n_groups: int = 1) -> dict:
    return {"BLOCK_T": _BLOCK_T, "BLOCK_E": triton.next_power_of_2(n_experts),
            "BLOCK_K": triton.next_power_of_2(top_k), "BLOCK_G": triton.next_power_of_2(n_groups)}


def route(logits_TE, top_k, score, bias_E, n_groups, topk_groups, normalize, scale):
    logits_TE = logits_TE.contiguous()
    n_tokens, n_experts = logits_TE.shape
    device = logits_TE.device
    acc_dtype = torch.float64 if logits_TE.dtype == torch.float64 else torch.float32
    weights_TK = torch.empty(n_tokens, top_k, device=device, dtype=acc_dtype)
    experts_TK = torch.empty(n_tokens, top_k, device=device, dtype=torch.int32)
    counts_E = torch.zeros(n_experts, device=device, dtype=torch.int32)
    nan_flag = torch.zeros(1, device=device, dtype=torch.int32)
    blocks = _blocks(n_experts, top_k, n_groups)
    _route_kernel[(triton.cdiv(n_tokens, blocks["BLOCK_T"]),)](
        logits_TE, bias_E if bias_E is not None else logits_TE, weights_TK, experts_TK, counts_E,
        nan_flag, n_tokens, n_experts, logits_TE.stride(0), top_k, n_groups, topk_groups,
        float(scale), SIGMOID=score == "sigmoid", HAS_BIAS=bias_E is not None,
        NORMALIZE=normalize, **blocks)
    _raise_on_nan(nan_flag)
    return weights_TK, experts_TK, counts_E


def _raise_on_nan(nan_flag: torch.Tensor) -> None:
    """On the CPU (interpreter) the flag is free to read: raise the same ValueError as
    the C++ kernel. On a GPU, reading it would sync: assert on the device instead."""
    if nan_flag.device.type == "cpu":
        if nan_flag.item():
            raise ValueError("route: logits_TE contains NaN or +inf")
    else:
        torch._assert_async(nan_flag[0] == 0, "route: logits_TE contains NaN or +inf")


def route_backward(grad_weights_TK, logits_TE, experts_TK, score, normalize, scale):
    logits_TE = logits_TE.contiguous()
    n_tokens, n_experts = logits_TE.shape
    top_k = experts_TK.shape[1]
    grad_logits_TE = torch.empty_like(logits_TE)
    blocks = _blocks(n_experts, top_k)
    blocks.pop("BLOCK_G")
    _route_backward_kernel[(triton.cdiv(n_tokens, blocks["BLOCK_T"]),)](
        grad_weights_TK.contiguous(), logits_TE, experts_TK.contiguous(), grad_logits_TE,
        n_tokens, n_experts, logits_TE.stride(0), top_k, float(scale),
        SIGMOID=score == "sigmoid", NORMALIZE=normalize, **blocks)
    return grad_logits_TE
