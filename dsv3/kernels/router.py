"""Triton fused router: one kernel over a block of tokens' logits computes the
scores (softmax or sigmoid, fp32), the group-limited top-k selection with the
selection-only bias, the normalized and scaled weights, the per-expert counts
(integer atomics: exact and order-independent), a NaN flag and, when asked, each
program's partial sums for the balance losses (normalized scores per expert and
logsumexp^2, added up afterwards in program order: deterministic). HBM sees the
logits once: the kernel's later passes over a token's row (group scores, then the
top-k over the kept groups only) hit the L1/L2 copy. The backward
(router_backward.py) recomputes the scores from the logits instead of saving the
[T, E] probabilities.

Ties go to the lower expert index, as in the CPU kernel and the reference (a stable
descending sort). A group is scored by the sum of its two best selection scores
(DeepSeek-V3) or, with ``group_score="max"`` (the GROUP_MAX constexpr), by its best one
(DeepSeek-V2); the default variant compiles to the code it did before the option.
"""
import torch
import triton
import triton.language as tl

from dsv3.kernels import bitonic, device_checks
from dsv3.kernels.router_checks import check_route
from dsv3.kernels.config import INTERPRET


# Forward layout: one thread per token. Its logits are read as [chunks, BLOCK_T, CW]
# tiles, CW = one 16-byte vector; Triton lays such a tile out with the token axis
# across the lanes and the chunk and vector axes inside each thread, so every
# reduction over experts is in-register: no shuffles. (With a [BLOCK_T, E] tile the 32
# lanes of a warp split one token's row, and each argmax of the top-k costs a
# shuffle tree: the first version of this kernel spent ~6 ns a token on that, 0.02 of
# HBM bandwidth on an H200.) Tiles made here keep the token axis last for the same
# reason ([rows, BLOCK_T]: lanes along tokens).
#
# That layout comes from Triton's coalescing pass, which orders a load's axes by the
# contiguity of its addresses. The chunk and token axes tie (neither is contiguous),
# and Triton 3.6 breaks the tie the other way from 3.7 on: the earlier axis goes
# faster, so it put the chunks across the lanes. Compiled for sm_90, DeepSeek-V3's
# router (fp32 logits) then had 2930 shuffles and 15.8k instructions against 2 and
# 8.6k under 3.8 (benchmarks/sm90_compile_check --sass); the GPU machine runs 3.6.
# Under 3.6 these tiles are therefore loaded and stored token-major ([BLOCK_T,
# chunks, CW], the token axis first) and permuted, which moves no data.
_TOKENS_OUTER: tl.constexpr = tl.constexpr(
    tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 7))


@triton.jit
def _load_tile(pointers, mask, other):
    """tl.load of a [rows, BLOCK_T, ...] tile (3-D, or 2-D [rows, BLOCK_T]) laid out
    one token a thread under every supported Triton (see _TOKENS_OUTER)."""
    if _TOKENS_OUTER:
        if len(pointers.shape) == 3:
            return tl.permute(tl.load(tl.permute(pointers, (1, 0, 2)),
                                      mask=tl.permute(mask, (1, 0, 2)), other=other), (1, 0, 2))
        return tl.trans(tl.load(tl.trans(pointers), mask=tl.trans(mask), other=other))
    return tl.load(pointers, mask=mask, other=other)


@triton.jit
def _store_tile(pointers, values, mask):
    """tl.store of a [rows, BLOCK_T, CW] tile, token-major where _load_tile loads so."""
    if _TOKENS_OUTER:
        tl.store(tl.permute(pointers, (1, 0, 2)), tl.permute(values, (1, 0, 2)),
                 mask=tl.permute(mask, (1, 0, 2)))
    else:
        tl.store(pointers, values, mask=mask)


@triton.jit
def _load_slab(logits_ptr, tokens, n_tokens, row_stride, col0, first, GROUP_SIZE: tl.constexpr,
               CHUNKS: tl.constexpr, CW: tl.constexpr):
    """Logits (fp32, -inf where invalid), their expert ids and validity, for experts
    col0 + [first, first + CHUNKS * CW) of each token's group; col0 may differ per token."""
    offsets = first + tl.arange(0, CHUNKS)[:, None, None] * CW + tl.arange(0, CW)[None, None, :]
    valid = (offsets < GROUP_SIZE) & (tokens < n_tokens)[None, :, None]
    cols = col0[None, :, None] + offsets
    logits = _load_tile(logits_ptr + tokens[None, :, None].to(tl.int64) * row_stride + cols,
                        valid, float("-inf")).to(tl.float32)
    return logits, cols, valid


# On a GPU, exp and 1/x are the bare approximate instructions (ex2.approx.ftz,
# rcp.approx.ftz: ~1-2 ulp, denormals flushed): Triton's own add range fix-ups to
# each, and the scores of 256 experts a token made those fix-ups a third of the
# kernel's instructions. The interpreter has no PTX: plain tl.exp and division there.
_FAST_MATH: tl.constexpr = tl.constexpr(not INTERPRET)


@triton.jit
def _exp(x):
    if _FAST_MATH:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f",
                                         [x * 1.4426950408889634], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return tl.exp(x)


@triton.jit
def _reciprocal(x):
    if _FAST_MATH:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    return 1.0 / x


@triton.jit
def _probs(logits, valid, row_max, row_scale, SIGMOID: tl.constexpr):
    """Scores of a slab, 0 where invalid; softmax takes its row's max and 1/exp-sum ([T])."""
    if SIGMOID:
        return tl.where(valid, _reciprocal(1.0 + _exp(-logits)), 0.0)
    return tl.where(valid, _exp(logits - row_max[None, :, None]), 0.0) * row_scale[None, :, None]


@triton.jit
def _choice(probs, cols, valid, bias_ptr, row_scale, HAS_BIAS: tl.constexpr,
            SIGMOID: tl.constexpr):
    """Selection scores: the scores plus the bias, -inf where invalid. A softmax row of
    -inf logits (row_scale 0) has no scores: its experts are the first K, as the
    reference's NaN scores leave them whatever the bias, so it takes no bias."""
    if HAS_BIAS:
        bias_valid = valid if SIGMOID else valid & (row_scale > 0)[None, :, None]
        probs += _load_tile(bias_ptr + cols, bias_valid, 0.0).to(tl.float32)
    return tl.where(valid, probs, float("-inf"))


@triton.jit
def _max3(x):
    return tl.max(tl.max(x, 2), 0)


@triton.jit
def _sum3(x):
    return tl.sum(tl.sum(x, 2), 0)


@triton.jit
def _nan_max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _top2_combine(first_a, second_a, first_b, second_b):
    return (tl.maximum(first_a, first_b),
            tl.maximum(tl.minimum(first_a, first_b), tl.maximum(second_a, second_b)))


@triton.jit
def _top2(x):
    """A slab's best and second-best values per token (equal when the best is there twice)."""
    first, second = tl.reduce((x, tl.full(x.shape, float("-inf"), tl.float32)), 2, _top2_combine)
    return tl.reduce((first, second), 0, _top2_combine)


@triton.jit
def _merge_slab(logits_ptr, bias_ptr, tokens, n_tokens, group, first, row_max, row_scale,
                top_scores, top_ids, slots, MERGE: tl.constexpr, N_EXPERTS: tl.constexpr,
                GROUP_SIZE: tl.constexpr, TOP_K: tl.constexpr, SIGMOID: tl.constexpr,
                HAS_BIAS: tl.constexpr, SLAB_CHUNKS: tl.constexpr, CW: tl.constexpr):
    """The top-k list ([BLOCK_K, T] scores and ids, sorted) merged with one slab of a
    group's selection scores in TOP_K rounds. A round takes the best score and, among
    equal ones, the lowest expert id (the reference's stable sort). Without MERGE (the
    first slab) the list is empty and only the slab is searched; merging with the empty
    list gives the same result."""
    logits, cols, valid = _load_slab(logits_ptr, tokens, n_tokens, N_EXPERTS,
                                     group * GROUP_SIZE, first, GROUP_SIZE, SLAB_CHUNKS, CW)
    choice = _choice(_probs(logits, valid, row_max, row_scale, SIGMOID), cols, valid,
                     bias_ptr, row_scale, HAS_BIAS, SIGMOID)
    merged_scores = top_scores
    merged_ids = top_ids
    for k in tl.static_range(TOP_K):
        best = _max3(choice)
        if MERGE:
            best = tl.maximum(best, tl.max(top_scores, 0))
        best_id = tl.min(tl.min(tl.where(choice == best[None, :, None], cols, N_EXPERTS), 2), 0)
        if MERGE:
            best_id = tl.minimum(best_id, tl.min(
                tl.where(top_scores == best[None, :], top_ids, N_EXPERTS), 0))
            top_scores = tl.where(top_ids == best_id[None, :], float("-inf"), top_scores)
        choice = tl.where(cols == best_id[None, :, None], float("-inf"), choice)
        merged_scores = tl.where(slots[:, None] == k, best[None, :], merged_scores)
        merged_ids = tl.where(slots[:, None] == k, best_id[None, :], merged_ids)
    return merged_scores, merged_ids


@triton.jit
def _merge_slab_keys(logits_ptr, bias_ptr, tokens, n_tokens, group, first, row_max, row_scale,
                     top_keys, MERGE: tl.constexpr, N_EXPERTS: tl.constexpr,
                     GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, SIGMOID: tl.constexpr,
                     HAS_BIAS: tl.constexpr, SLAB_CHUNKS: tl.constexpr, CW: tl.constexpr):
    """_merge_slab by a bitonic network (NETWORK): the top-k list is [T, BLOCK_K] keys
    (dsv3/kernels/bitonic.py), sorted descending."""
    logits, cols, valid = _load_slab(logits_ptr, tokens, n_tokens, N_EXPERTS,
                                     group * GROUP_SIZE, first, GROUP_SIZE, SLAB_CHUNKS, CW)
    choice = _choice(_probs(logits, valid, row_max, row_scale, SIGMOID), cols, valid,
                     bias_ptr, row_scale, HAS_BIAS, SIGMOID)
    keys = tl.permute(bitonic.keys_of(choice, cols, valid, N_EXPERTS), (1, 0, 2))
    slab_top = bitonic.top_keys(tl.reshape(keys, (keys.shape[0], keys.shape[1] * CW)), BLOCK_K)
    if MERGE:
        slab_top = bitonic.merge_top_keys(top_keys, slab_top)
    return slab_top


@triton.jit
def _store_loss_sums(logits_ptr, partial_row, tokens, n_tokens, token_mask, row_max, row_scale,
                     score_scale, lse_shift, exp_total, N_EXPERTS: tl.constexpr,
                     SIGMOID: tl.constexpr, SLAB: tl.constexpr, SLAB_CHUNKS: tl.constexpr,
                     CW: tl.constexpr):
    """The program's row of partial sums for the balance losses: the row-normalized
    scores summed per expert over its tokens, then their logsumexp^2 summed. The sums
    over the tokens are shuffle trees across the lanes (about a fifth of this path's
    instructions): the price of one thread per token."""
    no_token = tl.zeros_like(tokens)
    for first in range(0, N_EXPERTS, SLAB):
        logits, _, valid = _load_slab(logits_ptr, tokens, n_tokens, N_EXPERTS, no_token, first,
                                      N_EXPERTS, SLAB_CHUNKS, CW)
        normalized = _probs(logits, valid, row_max, row_scale, SIGMOID) * score_scale[None, :, None]
        offsets = first + tl.arange(0, SLAB_CHUNKS)[:, None] * CW + tl.arange(0, CW)[None, :]
        tl.store(partial_row + offsets, tl.sum(normalized, 1), mask=offsets < N_EXPERTS)
    lse = tl.where(exp_total > 0, lse_shift + tl.log(tl.where(exp_total > 0, exp_total, 1.0)),
                   float("-inf"))
    tl.store(partial_row + N_EXPERTS, tl.sum(tl.where(token_mask, lse * lse, 0.0), 0))


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, weights_ptr, experts_ptr, counts_ptr, nan_ptr,
                  partial_ptr, n_tokens, scale, N_EXPERTS: tl.constexpr,
                  TOP_K: tl.constexpr, N_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr,
                  SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
                  STATS: tl.constexpr, BLOCK_T: tl.constexpr, CW: tl.constexpr,
                  SLAB_CHUNKS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
                  COUNT_BINS: tl.constexpr, NETWORK: tl.constexpr,
                  GROUP_MAX: tl.constexpr = False):
    GROUP_SIZE: tl.constexpr = N_EXPERTS // N_GROUPS
    # The loss sums' cross-token reductions (barriers) and stores after the selection
    # where a row is at most 16 experts: the selection's pass then reuses the loads and
    # exps of the passes before it (sm_90, Triton 3.6: 7-14% fewer instructions, Mixtral's
    # 600 -> 560 a token). Wider rows keep them before: their logits would stay live
    # through the selection (64 experts: 96 -> 168 registers).
    LATE_SUMS: tl.constexpr = N_EXPERTS <= 16
    SLAB: tl.constexpr = SLAB_CHUNKS * CW
    SLABS: tl.constexpr = (GROUP_SIZE + SLAB - 1) // SLAB
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < n_tokens
    no_token = tl.zeros((BLOCK_T,), tl.int32)  # a per-token zero: the first group's col0
    minus_inf = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    # The row's largest logit, NaN if it has one: the NaN/+inf check, softmax's shift
    # and the stats' logsumexp all start from it.
    row_high = minus_inf
    row_max = tl.zeros((BLOCK_T,), tl.float32)
    row_scale = tl.full((BLOCK_T,), 1.0, tl.float32)  # softmax: 1 / the row's exp-sum
    # The passes over the whole row (softmax's, the stats') ignore the groups: slabs of
    # the row in order.
    if not SIGMOID:  # softmax: the row's max, then its exp-sum, before any score
        for first in range(0, N_EXPERTS, SLAB):
            logits, _, _ = _load_slab(logits_ptr, tokens, n_tokens, N_EXPERTS, no_token, first,
                                      N_EXPERTS, SLAB_CHUNKS, CW)
            row_high = _nan_max(row_high, tl.reduce(tl.reduce(logits, 2, _nan_max), 0, _nan_max))
        row_max = tl.where(row_high == float("-inf"), 0.0, row_high)  # an all -inf row: zeros
        row_total = tl.zeros((BLOCK_T,), tl.float32)
        for first in range(0, N_EXPERTS, SLAB):
            logits, _, valid = _load_slab(logits_ptr, tokens, n_tokens, N_EXPERTS, no_token,
                                          first, N_EXPERTS, SLAB_CHUNKS, CW)
            row_total += _sum3(tl.where(valid, _exp(logits - row_max[None, :, None]), 0.0))
        # 0 for a row of -inf logits (its scores are 0 either way; _choice reads it).
        row_scale = tl.where(row_total > 0,
                             _reciprocal(tl.where(row_total > 0, row_total, 1.0)), 0.0)

    # Pass 1, every expert (softmax: only with groups): the group scores, the sum of
    # each group's two best selection scores (DeepSeek-V3), or with GROUP_MAX its best
    # one (DeepSeek-V2).
    group_ids = tl.arange(0, BLOCK_G)
    group_scores = tl.full((BLOCK_G, BLOCK_T), float("-inf"), tl.float32)
    if SIGMOID or N_GROUPS > 1:
        for g in range(N_GROUPS):
            best = minus_inf
            runner_up = minus_inf
            for first in range(0, GROUP_SIZE, SLAB):
                logits, cols, valid = _load_slab(logits_ptr, tokens, n_tokens, N_EXPERTS,
                                                 no_token + g * GROUP_SIZE, first, GROUP_SIZE,
                                                 SLAB_CHUNKS, CW)
                if SIGMOID:
                    row_high = _nan_max(row_high, tl.reduce(tl.reduce(logits, 2, _nan_max), 0,
                                                            _nan_max))
                if N_GROUPS > 1:
                    choice = _choice(_probs(logits, valid, row_max, row_scale, SIGMOID), cols,
                                     valid, bias_ptr, row_scale, HAS_BIAS, SIGMOID)
                    if GROUP_MAX:
                        best = tl.maximum(best, _max3(choice))
                    else:
                        best, runner_up = _top2_combine(best, runner_up, *_top2(choice))
            if N_GROUPS > 1:
                score = best + runner_up if GROUP_SIZE > 1 and not GROUP_MAX else best
                group_scores = tl.where(group_ids[:, None] == g, score[None, :], group_scores)
    if N_GROUPS > 1:
        # Pass 2 marks a kept group -inf: a group scored -inf (a top-2 sum overflowing under
        # a bias near -fp32's max) is raised to -fp32's max, still below every other
        # score and tied to the lower group, so it is kept in the reference's order
        # rather than a kept group a second time.
        group_scores = tl.where((group_ids[:, None] < N_GROUPS)
                                & (group_scores == float("-inf")), -3.4028234663852886e38,
                                group_scores)
    has_nan = (row_high != row_high) | (row_high == float("inf"))

    if STATS:
        # This program's row of partial sums (_store_loss_sums), from each token's score
        # and exp totals.
        partial_row = partial_ptr + tl.program_id(0).to(tl.int64) * (N_EXPERTS + 1)
        lse_shift = tl.where(row_high == float("-inf"), 0.0, row_high)
        score_total = tl.zeros((BLOCK_T,), tl.float32)
        exp_total = tl.zeros((BLOCK_T,), tl.float32)
        for first in range(0, N_EXPERTS, SLAB):
            logits, _, valid = _load_slab(logits_ptr, tokens, n_tokens, N_EXPERTS, no_token,
                                          first, N_EXPERTS, SLAB_CHUNKS, CW)
            score_total += _sum3(_probs(logits, valid, row_max, row_scale, SIGMOID))
            exp_total += _sum3(tl.where(valid, _exp(logits - lse_shift[None, :, None]), 0.0))
        # A row whose scores are all 0 has NaN normalized scores, as the reference's: 0 / 0
        # for sigmoid scores that underflow (logits of -inf, or of -200), and a softmax
        # row of -inf logits has none (see the weights below; its row_scale is 0).
        score_scale = tl.where(token_mask & (score_total == 0), float("nan"),
                               _reciprocal(tl.where(score_total > 0, score_total, 1.0)))
        if not LATE_SUMS:
            _store_loss_sums(logits_ptr, partial_row, tokens, n_tokens, token_mask, row_max,
                             row_scale, score_scale, lse_shift, exp_total, N_EXPERTS, SIGMOID,
                             SLAB, SLAB_CHUNKS, CW)

    # Pass 2, the kept groups only, best group first: the top-k. With NETWORK, each slab's
    # top-k by a bitonic network merged into the list (bitonic.py); else the list is
    # merged with each slab in TOP_K rounds, a round taking the best score and, among
    # equal ones, the lowest expert id. Either way ties go to the lower id (the
    # reference's stable sort), whatever order the slabs come in.
    slots = tl.arange(0, BLOCK_K)
    top_scores = tl.full((BLOCK_K, BLOCK_T), float("-inf"), tl.float32)
    top_ids = tl.full((BLOCK_K, BLOCK_T), N_EXPERTS, tl.int32)
    top_keys = bitonic.no_keys(BLOCK_T, BLOCK_K)
    for r in tl.static_range(TOPK_GROUPS):
        group = no_token
        if N_GROUPS > 1:
            group = tl.argmax(group_scores, 0, tie_break_left=True).to(tl.int32)
            group_scores = tl.where(group_ids[:, None] == group[None, :], float("-inf"),
                                    group_scores)
            # A NaN row's group scores are NaN, which Triton 3.6's argmax ranks below the
            # -inf of the padding groups past N_GROUPS (BLOCK_G is a power of two): the
            # loads below would read past the row's end and bias_E's. The row raises; its
            # reads stay inside the tensors.
            group = tl.minimum(group, N_GROUPS - 1)
        if SLABS == 1:  # a group of up to 64 experts (DeepSeek-V3's 32, Mixtral's 8)
            if NETWORK:
                top_keys = _merge_slab_keys(
                    logits_ptr, bias_ptr, tokens, n_tokens, group, 0, row_max, row_scale,
                    top_keys, r > 0, N_EXPERTS, GROUP_SIZE, BLOCK_K, SIGMOID, HAS_BIAS,
                    SLAB_CHUNKS, CW)
            else:
                top_scores, top_ids = _merge_slab(
                    logits_ptr, bias_ptr, tokens, n_tokens, group, 0, row_max, row_scale,
                    top_scores, top_ids, slots, r > 0, N_EXPERTS, GROUP_SIZE, TOP_K, SIGMOID,
                    HAS_BIAS, SLAB_CHUNKS, CW)
        else:
            # A loop, not unrolled: unrolled over its 6 slabs, a 384-expert top-8 over fp32
            # logits took 75 s to compile for sm_90 on this project's CI machine (2.9 s
            # rolled; 128 experts: 7.5 s against 2.3 s). The first slab merges with the
            # empty list, which changes nothing.
            for s in range(SLABS):
                if NETWORK:
                    top_keys = _merge_slab_keys(
                        logits_ptr, bias_ptr, tokens, n_tokens, group, s * SLAB, row_max,
                        row_scale, top_keys, True, N_EXPERTS, GROUP_SIZE, BLOCK_K, SIGMOID,
                        HAS_BIAS, SLAB_CHUNKS, CW)
                else:
                    top_scores, top_ids = _merge_slab(
                        logits_ptr, bias_ptr, tokens, n_tokens, group, s * SLAB, row_max,
                        row_scale, top_scores, top_ids, slots, True, N_EXPERTS, GROUP_SIZE,
                        TOP_K, SIGMOID, HAS_BIAS, SLAB_CHUNKS, CW)
    if NETWORK:
        top_keys_KT = tl.trans(top_keys)
        top_scores = bitonic.scores_of(top_keys_KT)
        top_ids = bitonic.ids_of(top_keys_KT, N_EXPERTS)
    # A NaN or +inf row (flagged above: the op raises, on a GPU asynchronously) equals no
    # score in the rounds, so its ids stay N_EXPERTS; kept below it, its loads, stores and
    # counts stay inside their tensors until the error is seen. (The network's keys hold
    # ids in range but for a NaN row's, whose scores may decode as anything.)
    top_ids = tl.minimum(top_ids, N_EXPERTS - 1)

    out_mask = (slots[:, None] < TOP_K) & token_mask[None, :]
    weights = top_scores
    if HAS_BIAS:  # the weights are the scores without the bias: recompute the chosen ones
        chosen = _load_tile(logits_ptr + tokens[None, :].to(tl.int64) * N_EXPERTS + top_ids,
                            out_mask, float("-inf")).to(tl.float32)
        if SIGMOID:
            weights = _reciprocal(1.0 + _exp(-chosen))
        else:
            weights = _exp(chosen - row_max[None, :]) * row_scale[None, :]
    weights = tl.where(out_mask, weights, 0.0)
    if not SIGMOID:
        # A row of -inf logits (row_scale 0) has no softmax: torch's, the reference's
        # and the C++ kernel's is NaN, and so are its weights here. (Its choice, by the
        # zeros the scores are computed as, is the reference's: the first K experts.)
        weights = tl.where((row_scale == 0)[None, :], float("nan"), weights)
    if NORMALIZE:
        weights = weights / (tl.sum(weights, 0)[None, :] + 1e-20)
    weights = weights * scale
    if STATS and LATE_SUMS:
        _store_loss_sums(logits_ptr, partial_row, tokens, n_tokens, token_mask, row_max,
                         row_scale, score_scale, lse_shift, exp_total, N_EXPERTS, SIGMOID, SLAB,
                         SLAB_CHUNKS, CW)
    # Only a token that has one writes the flag (zeroed by the launcher): a masked-off
    # atomic sends nothing, so routing without NaN puts no traffic on the one address
    # (a batch of NaN rows, which raises anyway, pays an atomic a row).
    # Written after the passes over the logits: a write between two of them would keep
    # the compiler from reusing the first pass's loads in the next.
    tl.atomic_max(nan_ptr + no_token, 1, mask=has_nan & token_mask, sem="relaxed")
    out_offsets = tokens[None, :].to(tl.int64) * TOP_K + slots[:, None]
    tl.store(weights_ptr + out_offsets, weights, mask=out_mask)
    tl.store(experts_ptr + out_offsets, top_ids, mask=out_mask)
    # The counts' and the NaN flag's atomics are relaxed: nothing in this kernel reads
    # them, and the kernels after it on the stream see them whole. (The default acq_rel
    # put a fence before each one in the sm_90 SASS.)
    if COUNT_BINS > 0:
        # Few experts (Mixtral's 8): every copy's atomic would land on a few counters in
        # one 32-byte sector, which L2 serialises (16M a batch at 8M tokens, top-2).
        # The program sums its copies per expert first, a one-hot [K, T, bins] tile
        # reduced over tokens and slots, then adds them with at most COUNT_BINS atomics.
        # Plain sums, not tl.histogram: its masked form miscounted on an H200 with
        # triton 3.6 while the interpreter got it right (benchmarks/RESULTS.md, run 4).
        bins = tl.arange(0, COUNT_BINS)
        hits = (top_ids[:, :, None] == bins[None, None, :]) & out_mask[:, :, None]
        # Over the slots first, inside each thread; then one sum across the lanes a bin.
        per_expert = tl.sum(tl.sum(hits.to(tl.int32), 0), 0)
        tl.atomic_add(counts_ptr + bins, per_expert, mask=(bins < N_EXPERTS) & (per_expert > 0),
                      sem="relaxed")
    else:  # many experts: one atomic per copy, spread over as many counters
        tl.atomic_add(counts_ptr + top_ids, 1, mask=out_mask, sem="relaxed")


# Tokens per program, one per thread (4 warps); experts per slab, at most
# (kept in registers while the top-k merges them: 64 fp32 scores and their ids).
_TOKENS_PER_PROGRAM = 16 if INTERPRET else 128
_SLAB_EXPERTS = 64
# Counts summed per program (COUNT_BINS) while a thread's one-hot slots x bins stay
# this small: Mixtral's top-2 of 8 takes 16, the one shape gpu_bench times both ways.
# Wider ones (top-4 of 16: 64) cost more instructions than they might save in
# contention, unmeasured; top-8 of 256 would take 2048. Past it, one atomic per copy.
_ONE_HOT_COUNTS = 16
# Tokens a thread takes where the counts are summed per program (COUNT_BINS): the
# program's sums, its setup and its counters' atomics are then paid once for four
# tokens a thread. sm_90 (Triton 3.6), Mixtral's top-2 of 8 over fp32 logits: 344
# instructions a token at one token a thread, 270 at four (69 registers); with more
# experts the selection outweighs that share (top-4 of 16: 568 -> 546), so they keep
# one. Taken from 128 such programs on (about one an SM of an H200's 132): below, the
# launch keeps more, smaller programs to spread over the SMs.
_WIDE_TOKENS_PER_THREAD = 4
_WIDE_MIN_PROGRAMS = 2 if INTERPRET else 128
# The top-k by a bitonic network (NETWORK) from top-4 on, where the list is merged with
# more than one slab (groups kept, or groups past a slab); sm_90 instructions and
# registers a token under Triton 3.6, rounds -> network: DeepSeek-V3 (top-8 of 4 x 32)
# 8,800 / 228 -> 6,648 / 113, Qwen3-MoE (top-8 of 128) 4,872 / 252 -> 3,856 / 128. Over
# one slab the rounds cost less (top-8 of 40: 2,328 -> 2,456; Mixtral's top-2 of 8: 400
# -> 1,112).
_NETWORK_TOP_K = 4


def _network(block_k: int, slab: int, merges: int) -> bool:
    """Whether the top-k of block_k (a power of two) over ``merges`` slabs of ``slab``
    experts is taken by the bitonic network (it needs a slab of at least block_k)."""
    return _NETWORK_TOP_K <= block_k <= slab and merges > 1


def _blocks(logits_TE: torch.Tensor, top_k: int, n_groups: int = 1,
            topk_groups: int = 1) -> dict:
    group_size = logits_TE.shape[1] // n_groups
    # Experts per load: 16 bytes, or fewer where E is not a multiple (rows must start
    # on a whole vector). The row stride is E, a compile-time constant, so the
    # compiler sees this alignment and gives each thread its token's vectors; unproven,
    # it would spread a row over the lanes and reduce across them with shuffles.
    vector = max(16 // logits_TE.element_size(), 1)
    while logits_TE.shape[1] % vector:
        vector //= 2
    chunks = triton.next_power_of_2(triton.cdiv(group_size, vector))
    slab_chunks = min(chunks, max(_SLAB_EXPERTS // vector, 1))
    bins, block_k = triton.next_power_of_2(logits_TE.shape[1]), triton.next_power_of_2(top_k)
    return {"BLOCK_T": _TOKENS_PER_PROGRAM, "CW": vector,
            "COUNT_BINS": bins if bins * block_k <= _ONE_HOT_COUNTS else 0,
            "SLAB_CHUNKS": slab_chunks, "BLOCK_K": block_k,
            # Only where groups start on whole vectors: else a token's experts spread over
            # the lanes and Triton moves the keys through shared memory (E=72 in groups
            # of 9: 220 shared-memory accesses and 58 barriers against 58 and 20).
            "NETWORK": group_size % vector == 0 and _network(
                block_k, slab_chunks * vector,
                topk_groups * triton.cdiv(group_size, slab_chunks * vector)),
            "BLOCK_G": triton.next_power_of_2(n_groups),
            "num_warps": max(_TOKENS_PER_PROGRAM // 32, 1)}


def _widened(blocks: dict, n_tokens: int) -> dict:
    """The forward's blocks, with _WIDE_TOKENS_PER_THREAD tokens a thread (same warps)
    where the counts are summed per program and the tokens fill enough programs."""
    wide = blocks["BLOCK_T"] * _WIDE_TOKENS_PER_THREAD
    if blocks["COUNT_BINS"] and n_tokens >= _WIDE_MIN_PROGRAMS * wide:
        return {**blocks, "BLOCK_T": wide}
    return blocks


def route(logits_TE, top_k, score, bias_E, n_groups, topk_groups, normalize, scale, stats,
          group_score="top2_sum"):
    check_route(logits_TE, top_k, bias_E, n_groups, topk_groups)
    logits_TE = logits_TE.contiguous()
    # The kernel reads bias_E[e] at bias_ptr + e: a strided view (bias[::2]) would
    # have it pick experts by other experts' biases.
    bias_E = bias_E.contiguous() if bias_E is not None else None
    n_tokens, n_experts = logits_TE.shape
    device = logits_TE.device
    acc_dtype = torch.float64 if logits_TE.dtype == torch.float64 else torch.float32
    weights_TK = torch.empty(n_tokens, top_k, device=device, dtype=acc_dtype)
    experts_TK = torch.empty(n_tokens, top_k, device=device, dtype=torch.int32)
    counts_E = torch.zeros(n_experts, device=device, dtype=torch.int32)
    nan_flag = torch.zeros(1, device=device, dtype=torch.int32)
    blocks = _widened(_blocks(logits_TE, top_k, n_groups, topk_groups if n_groups > 1 else 1),
                      n_tokens)
    n_programs = triton.cdiv(n_tokens, blocks["BLOCK_T"])
    partial_PX = torch.empty(n_programs if stats else 0, n_experts + 1, device=device,
                             dtype=torch.float32)
    _route_kernel[(n_programs,)](
        logits_TE, bias_E if bias_E is not None else logits_TE, weights_TK, experts_TK, counts_E,
        nan_flag, partial_PX, n_tokens, float(scale), N_EXPERTS=n_experts,
        TOP_K=top_k, N_GROUPS=n_groups, TOPK_GROUPS=topk_groups if n_groups > 1 else 1,
        SIGMOID=score == "sigmoid", HAS_BIAS=bias_E is not None, NORMALIZE=normalize,
        STATS=stats, **blocks, **_group_max(group_score, n_groups))
    _raise_on_nan(nan_flag)
    if bias_E is not None:
        _raise_on_bad_bias(bias_E)
    if not stats:
        empty = weights_TK.new_empty(0)
        return weights_TK, experts_TK, counts_E, empty, empty.clone()
    sums_X = partial_PX.sum(0).to(acc_dtype)
    return weights_TK, experts_TK, counts_E, sums_X[:n_experts].clone(), sums_X[n_experts].clone()


def _group_max(group_score: str, n_groups: int) -> dict:
    """GROUP_MAX for ``group_score``, passed only where it is set: the default variant
    is launched exactly as before the option (one groupless variant either way)."""
    if group_score not in ("top2_sum", "max"):  # the C++ kernel's check
        raise ValueError(f"route: group_score must be 'top2_sum' or 'max', got {group_score!r}")
    return {"GROUP_MAX": True} if group_score == "max" and n_groups > 1 else {}


def _raise_on_nan(nan_flag: torch.Tensor) -> None:
    device_checks.raise_unless(nan_flag == 0, "route: logits_TE contains NaN or +inf")


def _raise_on_bad_bias(bias_E: torch.Tensor) -> None:
    """The C++ kernel's check that bias_E is finite."""
    device_checks.raise_unless(torch.isfinite(bias_E).all(), "route: bias_E must be finite")
