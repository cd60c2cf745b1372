"""Triton fused router: one pass over a block of tokens' logits computes the
scores (softmax or sigmoid, fp32), the group-limited top-k selection with the
selection-only bias, the normalized and scaled weights, the per-expert counts
(integer atomics: exact and order-independent), a NaN flag and, when asked, each
program's partial sums for the balance losses (normalized scores per expert and
logsumexp^2, added up afterwards in program order: deterministic), so the logits
are read once. The backward recomputes the scores from the logits instead of saving
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
def _logsumexp(logits):
    """Row-wise log(sum(exp)) of a [BLOCK_T, BLOCK_E] tile padded with -inf."""
    row_max = tl.max(logits, 1)
    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    total = tl.sum(tl.exp(logits - safe_max[:, None]), 1)
    return tl.where(total > 0, safe_max + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, weights_ptr, experts_ptr, counts_ptr, nan_ptr,
                  partial_ptr, n_tokens, n_experts, stride_t, top_k, n_groups, topk_groups,
                  scale, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
                  STATS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    token_mask = tokens < n_tokens
    logits, probs = _scores(logits_ptr, stride_t, tokens, cols, n_tokens, n_experts, SIGMOID)
    has_nan = tl.sum(tl.where((logits != logits) | (logits == float("inf")), 1, 0), 1)
    tl.atomic_max(nan_ptr, tl.max(has_nan, 0))
    if STATS:
        # This program's row of partial sums: normalized scores per expert, then lse^2.
        row_total = tl.sum(probs, 1)
        normalized = probs / tl.where(row_total > 0, row_total, 1.0)[:, None]
        partial_row = partial_ptr + tl.program_id(0).to(tl.int64) * (n_experts + 1)
        tl.store(partial_row + cols, tl.sum(normalized, 0), mask=cols < n_experts)
        lse = _logsumexp(logits)
        tl.store(partial_row + n_experts, tl.sum(tl.where(token_mask, lse * lse, 0.0), 0))

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
def _route_backward_kernel(grad_w_ptr, grad_sum_ptr, grad_z_ptr, logits_ptr, experts_ptr,
                           grad_logits_ptr, n_tokens, n_experts, stride_t, top_k, scale,
                           SIGMOID: tl.constexpr, NORMALIZE: tl.constexpr,
                           HAS_GRAD_W: tl.constexpr, HAS_GRAD_SUM: tl.constexpr,
                           HAS_GRAD_Z: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    # With p the scores, s the sum of the chosen ones and g = dL/dw: normalized
    # weights give dL/dp_k = scale / s * (g_k - sum_j g_j p_j / s), else scale * g_k.
    # Score sums (q = p / sum(p), h = dL/d(score_sum_E)): dL/dp_e += (h_e - h.q) / sum(p).
    # Softmax: dL/dl_e = p_e (dL/dp_e - sum_j dL/dp_j p_j); sigmoid: dL/dp_e p_e (1 - p_e).
    # z: d(lse^2)/dl_e = 2 lse softmax(l)_e.
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, BLOCK_K)
    logits, probs = _scores(logits_ptr, stride_t, tokens, cols, n_tokens, n_experts, SIGMOID)
    grad_p_full = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    if HAS_GRAD_W:
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
        for k in range(top_k):
            expert_k = tl.sum(tl.where(slots[None, :] == k, chosen, 0), 1)
            grad_k = tl.sum(tl.where(slots[None, :] == k, grad_p, 0.0), 1)
            grad_p_full = tl.where(cols[None, :] == expert_k[:, None], grad_k[:, None], grad_p_full)
    if HAS_GRAD_SUM:
        grad_sum = tl.load(grad_sum_ptr + cols, mask=cols < n_experts, other=0.0).to(tl.float32)
        if SIGMOID:
            row_total = tl.sum(probs, 1)
            row_total = tl.where(row_total > 0, row_total, 1.0)
        else:
            row_total = tl.full((BLOCK_T,), 1.0, tl.float32)
        h_dot_p = tl.sum(grad_sum[None, :] * probs, 1)
        grad_p_full += (grad_sum[None, :] - (h_dot_p / row_total)[:, None]) / row_total[:, None]
    if SIGMOID:
        grad_logits = grad_p_full * probs * (1.0 - probs)
    else:
        grad_logits = probs * (grad_p_full - tl.sum(grad_p_full * probs, 1)[:, None])
    mask = (tokens[:, None] < n_tokens) & (cols[None, :] < n_experts)
    if HAS_GRAD_Z:
        grad_z = tl.load(grad_z_ptr).to(tl.float32)
        lse = tl.where(tokens < n_tokens, _logsumexp(logits), 0.0)  # rows past the end: -inf
        softmax = tl.where(mask, tl.exp(logits - lse[:, None]), 0.0)
        grad_logits += grad_z * 2.0 * lse[:, None] * softmax
    tl.store(grad_logits_ptr + tokens[:, None].to(tl.int64) * n_experts + cols[None, :],
             grad_logits.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def _blocks(n_experts: int, top_k: int, n_groups: int = 1) -> dict:
    return {"BLOCK_T": _BLOCK_T, "BLOCK_E": triton.next_power_of_2(n_experts),
            "BLOCK_K": triton.next_power_of_2(top_k), "BLOCK_G": triton.next_power_of_2(n_groups)}


def route(logits_TE, top_k, score, bias_E, n_groups, topk_groups, normalize, scale, stats):
    logits_TE = logits_TE.contiguous()
    n_tokens, n_experts = logits_TE.shape
    device = logits_TE.device
    acc_dtype = torch.float64 if logits_TE.dtype == torch.float64 else torch.float32
    weights_TK = torch.empty(n_tokens, top_k, device=device, dtype=acc_dtype)
    experts_TK = torch.empty(n_tokens, top_k, device=device, dtype=torch.int32)
    counts_E = torch.zeros(n_experts, device=device, dtype=torch.int32)
    nan_flag = torch.zeros(1, device=device, dtype=torch.int32)
    blocks = _blocks(n_experts, top_k, n_groups)
    n_programs = triton.cdiv(n_tokens, blocks["BLOCK_T"])
    partial_PX = torch.empty(n_programs if stats else 0, n_experts + 1, device=device,
                             dtype=torch.float32)
    _route_kernel[(n_programs,)](
        logits_TE, bias_E if bias_E is not None else logits_TE, weights_TK, experts_TK, counts_E,
        nan_flag, partial_PX, n_tokens, n_experts, logits_TE.stride(0), top_k, n_groups,
        topk_groups, float(scale), SIGMOID=score == "sigmoid", HAS_BIAS=bias_E is not None,
        NORMALIZE=normalize, STATS=stats, **blocks)
    _raise_on_nan(nan_flag)
    if not stats:
        empty = weights_TK.new_empty(0)
        return weights_TK, experts_TK, counts_E, empty, empty.clone()
    sums_X = partial_PX.sum(0).to(acc_dtype)
    return weights_TK, experts_TK, counts_E, sums_X[:n_experts].clone(), sums_X[n_experts].clone()


def _raise_on_nan(nan_flag: torch.Tensor) -> None:
    """On the CPU (interpreter) the flag is free to read: raise the same ValueError as
    the C++ kernel. On a GPU, reading it would sync: assert on the device instead."""
    if nan_flag.device.type == "cpu":
        if nan_flag.item():
            raise ValueError("route: logits_TE contains NaN or +inf")
    else:
        torch._assert_async(nan_flag[0] == 0, "route: logits_TE contains NaN or +inf")


def route_backward(grad_weights_TK, grad_score_sum_E, grad_lse_sq_sum, logits_TE, experts_TK,
                   score, normalize, scale):
    logits_TE = logits_TE.contiguous()
    n_tokens, n_experts = logits_TE.shape
    top_k = experts_TK.shape[1]
    grad_logits_TE = torch.empty_like(logits_TE)
    blocks = _blocks(n_experts, top_k)
    blocks.pop("BLOCK_G")

    def pointer(grad):  # an absent gradient is never read: any tensor fills the slot
        return grad.contiguous() if grad is not None else logits_TE

    _route_backward_kernel[(triton.cdiv(n_tokens, blocks["BLOCK_T"]),)](
        pointer(grad_weights_TK), pointer(grad_score_sum_E), pointer(grad_lse_sq_sum), logits_TE,
        experts_TK.contiguous(), grad_logits_TE, n_tokens, n_experts, logits_TE.stride(0), top_k,
        float(scale), SIGMOID=score == "sigmoid", NORMALIZE=normalize,
        HAS_GRAD_W=grad_weights_TK is not None, HAS_GRAD_SUM=grad_score_sum_E is not None,
        HAS_GRAD_Z=grad_lse_sq_sum is not None, **blocks)
    return grad_logits_TE
