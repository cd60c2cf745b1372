"""The Triton router's backward: d(logits) from the gradients of the top-k weights, the
per-expert score sums and the logsumexp^2 sum, one thread per token as in the forward
(dsv3/kernels/router.py, whose tile loads and fast exp/reciprocal it shares). It
recomputes the scores from the logits instead of reading saved [T, E] probabilities.
"""
import torch
import triton
import triton.language as tl

from dsv3.kernels import device_checks
from dsv3.kernels.router import (_blocks, _exp, _load_slab, _load_tile, _max3, _reciprocal,
                                 _store_tile, _sum3)
from dsv3.kernels.router_checks import check_route_backward


@triton.jit
def _score_grad(grad_p, probs, g_dot_p, SIGMOID: tl.constexpr):
    """dL/dlogit from dL/dp: sigmoid p (1 - p) dL/dp; softmax p (dL/dp - sum_j dL/dp_j p_j)."""
    if SIGMOID:
        return grad_p * probs * (1.0 - probs)
    return probs * (grad_p - g_dot_p)


@triton.jit
def _route_backward_kernel(grad_w_ptr, grad_sum_ptr, grad_z_ptr, logits_ptr, experts_ptr,
                           grad_logits_ptr, ok_ptr, n_tokens, scale, N_EXPERTS: tl.constexpr,
                           TOP_K: tl.constexpr, SIGMOID: tl.constexpr, NORMALIZE: tl.constexpr,
                           HAS_GRAD_W: tl.constexpr, HAS_GRAD_SUM: tl.constexpr,
                           HAS_GRAD_Z: tl.constexpr, BLOCK_T: tl.constexpr, CW: tl.constexpr,
                           SLAB_CHUNKS: tl.constexpr, BLOCK_K: tl.constexpr):
    # One thread per token, as in the forward. With p the scores, s the sum of the
    # chosen ones and g = dL/dw: normalized weights give dL/dp_k = scale / s * (g_k -
    # sum_j g_j p_j / s), else scale * g_k. Score sums (q = p / sum(p), h =
    # dL/d(score_sum_E)): dL/dp_e += (h_e - h.q) / sum(p), dense over e. Softmax:
    # dL/dl_e = p_e (dL/dp_e - sum_j dL/dp_j p_j); sigmoid: dL/dp_e p_e (1 - p_e).
    # z: d(lse^2)/dl_e = 2 lse softmax(l)_e. The row is written dense (every term but
    # the top-k's), then the k chosen entries are rewritten with their g term added.
    SLAB: tl.constexpr = SLAB_CHUNKS * CW
    ONE_SLAB: tl.constexpr = N_EXPERTS <= SLAB
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < n_tokens
    no_col = tl.zeros((BLOCK_T,), tl.int32)
    zeros = tl.zeros((BLOCK_T,), tl.float32)
    # Row statistics: the max and exp-sum of the logits (softmax scores, logsumexp),
    # the sum of the scores and sum_e h_e p_e (score sums).
    row_high = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    for first in range(0, N_EXPERTS, SLAB):
        logits, _, _ = _load_slab(logits_ptr, tokens, n_tokens, N_EXPERTS, no_col, first,
                                  N_EXPERTS, SLAB_CHUNKS, CW)
        row_high = tl.maximum(row_high, _max3(logits))
    row_max = tl.where(row_high == float("-inf"), 0.0, row_high)
    exp_total = zeros
    score_total = zeros
    h_dot_p = zeros
    for first in range(0, N_EXPERTS, SLAB):
        logits, cols, valid = _load_slab(logits_ptr, tokens, n_tokens, N_EXPERTS, no_col, first,
                                         N_EXPERTS, SLAB_CHUNKS, CW)
        if HAS_GRAD_Z or not SIGMOID:  # sigmoid needs the exp-sum for the z term only
            exps = tl.where(valid, _exp(logits - row_max[None, :, None]), 0.0)
            exp_total += _sum3(exps)
        if SIGMOID:
            probs = tl.where(valid, _reciprocal(1.0 + _exp(-logits)), 0.0)
        else:
            probs = exps  # scaled by 1 / exp_total below
        score_total += _sum3(probs)
        if HAS_GRAD_SUM:
            h = _load_tile(grad_sum_ptr + cols, valid, 0.0).to(tl.float32)
            h_dot_p += _sum3(h * probs)
    exp_scale = _reciprocal(tl.where(exp_total > 0, exp_total, 1.0))
    if not SIGMOID:  # the sums were of exps: make them sums of scores
        # A row of -inf logits has no softmax (0 / 0): NaN scores, as the forward's
        # weights and sums, torch's, the reference's and the C++ kernel's, so NaN
        # gradients too, not the zeros a divisor of 1 made of it.
        exp_scale = tl.where(token_mask & (exp_total == 0), float("nan"), exp_scale)
        score_total = score_total * exp_scale
        h_dot_p = h_dot_p * exp_scale
    lse = tl.where(exp_total > 0, row_max + tl.log(tl.where(exp_total > 0, exp_total, 1.0)),
                   float("-inf"))
    lse = tl.where(token_mask, lse, 0.0)
    # The dense part of dL/dp: (h_e - h.p / t) / t, t = the score sum (1 for softmax, as
    # the reference leaves it).
    sum_total = score_total if SIGMOID else tl.full((BLOCK_T,), 1.0, tl.float32)
    sum_scale = _reciprocal(tl.where(sum_total > 0, sum_total, 1.0))
    # Sigmoid scores that all underflow (logits of -inf, or of -200) have NaN normalized
    # scores (0 / 0), in the forward's sums as in the reference: NaN gradients of the
    # sums too, as the reference's and the C++ kernel's, not a divisor of 1's finite ones.
    sum_scale = tl.where(token_mask & (sum_total == 0), float("nan"), sum_scale)
    h_shift = h_dot_p * sum_scale
    z_scale = zeros
    if HAS_GRAD_Z:
        z_scale = 2.0 * tl.load(grad_z_ptr).to(tl.float32) * lse

    # The top-k's dL/dp, from the chosen scores (gathered).
    slots = tl.arange(0, BLOCK_K)
    slot_mask = (slots[:, None] < TOP_K) & token_mask[None, :]
    slot_offsets = tokens[None, :].to(tl.int64) * TOP_K + slots[:, None]
    chosen = tl.load(experts_ptr + slot_offsets, mask=slot_mask, other=0)
    # An id outside [0, E) (a direct op call's) clears the "ids were good" flag, written
    # only by the threads that saw one (no reduction across the lanes), and reads and
    # writes expert 0 instead, inside the rows; the launcher raises. A row of one slab
    # writes the flag after its last pass over the logits, which then reuses the first
    # passes' loads and exps (sm_90, Triton 3.6: Mixtral's 272 -> 208 instructions a
    # token, 424 -> 344 with every gradient); a wider row writes it here, which keeps
    # fewer registers live through its passes (DeepSeek-V3's: 128 against 167).
    in_range = (chosen >= 0) & (chosen < N_EXPERTS)
    bad_token = tl.max((slot_mask & ~in_range).to(tl.int32), 0) > 0  # in-thread: slots
    if not ONE_SLAB:
        tl.store(ok_ptr + no_col, 0, mask=bad_token)
    chosen = tl.where(in_range, chosen, 0)
    chosen_logits = _load_tile(logits_ptr + tokens[None, :].to(tl.int64) * N_EXPERTS + chosen,
                               slot_mask, 0.0).to(tl.float32)
    if SIGMOID:
        chosen_p = _reciprocal(1.0 + _exp(-chosen_logits))
    else:
        chosen_p = _exp(chosen_logits - row_max[None, :]) * exp_scale[None, :]
    chosen_p = tl.where(slot_mask, chosen_p, 0.0)
    grad_chosen = tl.zeros((BLOCK_K, BLOCK_T), tl.float32)
    if HAS_GRAD_W:
        grad_w = tl.load(grad_w_ptr + slot_offsets, mask=slot_mask, other=0.0).to(tl.float32)
        if NORMALIZE:
            total = tl.sum(chosen_p, 0) + 1e-20
            g_dot_p = tl.sum(grad_w * chosen_p, 0)
            grad_chosen = scale / total[None, :] * (grad_w - (g_dot_p / total)[None, :])
        else:
            grad_chosen = scale * grad_w
    chosen_dense = tl.zeros((BLOCK_K, BLOCK_T), tl.float32)
    if HAS_GRAD_SUM:
        h_chosen = _load_tile(grad_sum_ptr + chosen, slot_mask, 0.0).to(tl.float32)
        chosen_dense = (h_chosen - h_shift[None, :]) * sum_scale[None, :]
    # Softmax's sum_j dL/dp_j p_j: the top-k's g terms plus the dense part's
    # sum_e (h_e - h_shift) / t p_e = (h.p - h_shift * sum p) / t.
    g_dot_p_all = tl.sum(grad_chosen * chosen_p, 0)
    if HAS_GRAD_SUM:
        g_dot_p_all += (h_dot_p - h_shift * score_total) * sum_scale

    out_row = grad_logits_ptr + tokens.to(tl.int64) * N_EXPERTS
    for first in range(0, N_EXPERTS, SLAB):
        logits, cols, valid = _load_slab(logits_ptr, tokens, n_tokens, N_EXPERTS, no_col, first,
                                         N_EXPERTS, SLAB_CHUNKS, CW)
        if SIGMOID:
            probs = tl.where(valid, _reciprocal(1.0 + _exp(-logits)), 0.0)
        else:
            probs = tl.where(valid, _exp(logits - row_max[None, :, None]), 0.0) \
                * exp_scale[None, :, None]
        grad_p = tl.zeros(logits.shape, tl.float32)
        if HAS_GRAD_SUM:
            h = _load_tile(grad_sum_ptr + cols, valid, 0.0).to(tl.float32)
            grad_p = (h - h_shift[None, :, None]) * sum_scale[None, :, None]
        grad = _score_grad(grad_p, probs, g_dot_p_all[None, :, None], SIGMOID)
        if HAS_GRAD_Z:
            softmax = tl.where(valid, _exp(logits - lse[None, :, None]), 0.0)
            grad += z_scale[None, :, None] * softmax
        _store_tile(out_row[None, :, None] + cols, grad.to(grad_logits_ptr.dtype.element_ty),
                    valid)
    if ONE_SLAB:
        tl.store(ok_ptr + no_col, 0, mask=bad_token)
    if HAS_GRAD_W:  # the chosen entries again, now with their g term
        # These stores overwrite ones of the dense loop above, and nothing orders two
        # threads' stores to one address. Today's layouts put a token's dense tile and its
        # [BLOCK_K] slots in the same thread (program order then suffices), but that is the
        # compiler's choice, not a promise: were a slot's entry another thread's, the
        # dense value could land last. The barrier orders them (one per program).
        tl.debug_barrier()
        grad = _score_grad(chosen_dense + grad_chosen, chosen_p, g_dot_p_all[None, :], SIGMOID)
        if HAS_GRAD_Z:
            grad += z_scale[None, :] * _exp(chosen_logits - lse[None, :])
        tl.store(out_row[None, :] + chosen, grad.to(grad_logits_ptr.dtype.element_ty),
                 mask=slot_mask)


def route_backward(grad_weights_TK, grad_score_sum_E, grad_lse_sq_sum, logits_TE, experts_TK,
                   score, normalize, scale):
    check_route_backward(grad_weights_TK, grad_score_sum_E, grad_lse_sq_sum, logits_TE,
                         experts_TK)
    logits_TE = logits_TE.contiguous()
    n_tokens, n_experts = logits_TE.shape
    top_k = experts_TK.shape[1]
    grad_logits_TE = torch.empty_like(logits_TE)
    ok = device_checks.good_flags(logits_TE.device)
    blocks = _blocks(logits_TE, top_k)
    blocks.pop("BLOCK_G")
    blocks.pop("COUNT_BINS")
    blocks.pop("NETWORK")

    def pointer(grad):  # an absent gradient is never read: any tensor fills the slot
        return grad.contiguous() if grad is not None else logits_TE

    _route_backward_kernel[(triton.cdiv(n_tokens, blocks["BLOCK_T"]),)](
        pointer(grad_weights_TK), pointer(grad_score_sum_E), pointer(grad_lse_sq_sum), logits_TE,
        experts_TK.contiguous(), grad_logits_TE, ok, n_tokens, float(scale),
        N_EXPERTS=n_experts, TOP_K=top_k, SIGMOID=score == "sigmoid", NORMALIZE=normalize,
        HAS_GRAD_W=grad_weights_TK is not None, HAS_GRAD_SUM=grad_score_sum_E is not None,
        HAS_GRAD_Z=grad_lse_sq_sum is not None, **blocks)
    device_checks.raise_unless(ok, f"route_backward: experts_TK values must be in [0, {n_experts})")
    return grad_logits_TE
