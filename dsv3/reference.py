"""Plain-PyTorch reference paths: routing, permutation, grouped expert FFN and a
whole MoE layer, written for obviousness rather than speed.

They are the truth every kernel is tested against and the "reference loop"
baseline of the benchmarks. Math is done in fp32 (fp64 for fp64 inputs) and cast
back, so a kernel's low-precision error can be judged against them.
"""
import math

import torch
import torch.nn.functional as F


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def route(logits_TE, top_k, score="softmax", bias_E=None, n_groups=1, topk_groups=1,
          normalize=True, scale=1.0, group_score="top2_sum"):
    """Top-k routing: (weights_TK, experts_TK int32, counts_E int32).

    With n_groups > 1 only the experts of the topk_groups best groups can be chosen, a
    group scored by the sum of its two best choice scores (``group_score="top2_sum"``,
    DeepSeek-V3) or by its best one (``"max"``, DeepSeek-V2). Ties, between groups as
    between experts, go to the lower index (a stable descending sort), as in the kernels.
    """
    if (torch.isnan(logits_TE) | (logits_TE == math.inf)).any():
        raise ValueError("route: logits_TE contains NaN or +inf")
    if bias_E is not None and not torch.isfinite(bias_E).all():
        raise ValueError("route: bias_E must be finite")
    logits_TE = logits_TE.to(_acc_dtype(logits_TE.dtype))
    n_tokens, n_experts = logits_TE.shape
    scores_TE = logits_TE.softmax(-1) if score == "softmax" else logits_TE.sigmoid()
    choice_TE = scores_TE.detach().clone()
    if bias_E is not None:
        choice_TE = choice_TE + bias_E.to(choice_TE.dtype)
    if n_groups > 1:
        # Group score: the sum of the group's two best choice scores (DeepSeek-V3), or
        # its best one (DeepSeek-V2).
        choice_TGX = choice_TE.view(n_tokens, n_groups, -1)
        best_TGX = choice_TGX.sort(dim=-1, descending=True, stable=True).values
        n_best = 1 if group_score == "max" else 2
        group_score_TG = best_TGX[..., : min(n_best, best_TGX.shape[-1])].sum(-1)
        groups_TG = group_score_TG.sort(dim=-1, descending=True, stable=True).indices[:, :topk_groups]
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter(1, groups_TG, True)
        choice_TE = choice_TGX.masked_fill(~keep_TG[..., None], -math.inf).view(n_tokens, n_experts)
    experts_TK = choice_TE.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights_TK = scores_TE.gather(1, experts_TK)
    if normalize:
        weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
    weights_TK = weights_TK * scale
    counts_E = torch.bincount(experts_TK.flatten(), minlength=n_experts).to(torch.int32)
    return weights_TK, experts_TK.to(torch.int32), counts_E


def route_stats(logits_TE, score="softmax"):
    """(score_sum_E, lse_sq_sum): the sums over tokens of the row-normalized scores
    and of logsumexp(logits)^2, which the load-balance and z losses are made of."""
    logits_TE = logits_TE.to(_acc_dtype(logits_TE.dtype))
    scores_TE = logits_TE.softmax(-1) if score == "softmax" else logits_TE.sigmoid()
    scores_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
    return scores_TE.sum(0), logits_TE.logsumexp(-1).square().sum()


def expert_index(experts_TK, n_experts):
    """(offsets_E, row_map_TK): a stable sort of routed copies by expert; id -1
    (a dropped copy) sorts after every expert. Device-side ops only (no host sync),
    so it also serves as the CUDA kernel of builds without csrc/cuda."""
    key_S = experts_TK.flatten().long()
    key_S = torch.where(key_S < 0, n_experts, key_S)
    order_S = torch.sort(key_S, stable=True).indices
    row_map_S = torch.empty_like(order_S)
    row_map_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    counts = torch.zeros(n_experts + 1, device=key_S.device, dtype=torch.int64)
    counts.scatter_add_(0, key_S, torch.ones_like(key_S))  # bincount would sync for its size
    offsets_E = counts[:n_experts].cumsum(0).to(torch.int32)
    return offsets_E, row_map_S.view(experts_TK.shape).to(torch.int32)


def permute(x_TD, experts_TK, n_experts):
    """(x_SD, offsets_E, row_map_TK) with x_SD[row_map_TK[t, k]] = x_TD[t]."""
    offsets_E, row_map_TK = expert_index(experts_TK, n_experts)
    top_k = experts_TK.shape[1]
    x_SD = x_TD.new_empty(x_TD.shape[0] * top_k, x_TD.shape[1])
    x_SD[row_map_TK.flatten().long()] = x_TD.repeat_interleave(top_k, dim=0)
    return x_SD, offsets_E, row_map_TK


def unpermute(y_SD, row_map_TK, weights_TK=None):
    """y_TD[t] = sum_k weights_TK[t, k] * y_SD[row_map_TK[t, k]]."""
    y_TKD = y_SD[row_map_TK.long()].to(_acc_dtype(y_SD.dtype))
    if weights_TK is not None:
        y_TKD = y_TKD * weights_TK.to(y_TKD.dtype)[..., None]
    return y_TKD.sum(1).to(y_SD.dtype)


def grouped_mm(x_SX, w_EXY, offsets_E):
    """y_SY[rows of e] = x_SX[rows of e] @ w_EXY[e]; rows past the last offset are 0."""
    y_SY = x_SX.new_zeros(x_SX.shape[0], w_EXY.shape[2])
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        # The kernels' check: a slice would wrap a negative end and clip one past S.
        if not start <= end <= x_SX.shape[0]:
            raise ValueError(f"grouped_mm: offsets_E must be non-decreasing and <= "
                             f"S={x_SX.shape[0]}, got offsets_E[{e}] = {end} after {start}")
        y_SY[start:end] = x_SX[start:end] @ w_EXY[e]
        start = end
    return y_SY


def swiglu(h_S2F, limit=None):
    """silu(gate) * up; with ``limit`` L, on gate.clamp(max=L) and up.clamp(-L, L)
    (GLM-5-Next, DeepSeek-V4), torch's clamp and its gradient."""
    gate_SF, up_SF = h_S2F.chunk(2, dim=-1)
    if limit is not None:
        gate_SF, up_SF = gate_SF.clamp(max=limit), up_SF.clamp(-limit, limit)
    return F.silu(gate_SF) * up_SF


def gpt_oss_glu(h_S2F, alpha, limit=None):
    """GPT-OSS's gated activation on interleaved rows (gate at even columns, up at odd):
    gate.clamp(max=L) * sigmoid(alpha * gate) * (up.clamp(-L, L) + 1), torch's clamp and
    its gradient; ``limit`` None clamps nothing."""
    gate_SF, up_SF = h_S2F[:, 0::2], h_S2F[:, 1::2]
    if limit is not None:
        gate_SF, up_SF = gate_SF.clamp(max=limit), up_SF.clamp(-limit, limit)
    return gate_SF * torch.sigmoid(gate_SF * alpha) * (up_SF + 1)


def expert_ffn(x_D, gate_up_2FD, down_DF, limit=None):
    """One SwiGLU expert with weights in nn.Linear's [out, in] layout."""
    return F.linear(swiglu(F.linear(x_D, gate_up_2FD), limit), down_DF)


def moe(x_TD, router_ED, gate_up_E2FD, down_EDF, *, top_k, score="softmax", bias_E=None,
        n_groups=1, topk_groups=1, normalize=True, scale=1.0, capacity=None, shared=None,
        swiglu_limit=None, group_score="top2_sum"):
    """A whole MoE layer as a loop over experts. Returns (y_TD, logits_TE, experts_TK).

    ``capacity`` caps the copies an expert takes (earlier tokens first; the rest are
    dropped); ``shared`` is an optional module applied to every token and added;
    ``swiglu_limit`` clamps the routed experts' SwiGLU (see ``swiglu``); ``group_score``
    scores the groups of group-limited routing (see ``route``).
    """
    # Router logits in fp32, as the layer computes them; in fp64 for fp64 inputs.
    router_dtype = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
    logits_TE = F.linear(x_TD.to(router_dtype), router_ED.to(router_dtype))
    weights_TK, experts_TK, _ = route(logits_TE, top_k, score, bias_E, n_groups, topk_groups,
                                      normalize, scale, group_score)
    y_TD = torch.zeros_like(x_TD)
    for e in range(gate_up_E2FD.shape[0]):
        tokens, slots = (experts_TK == e).nonzero(as_tuple=True)  # in token order
        if capacity is not None:
            tokens, slots = tokens[:capacity], slots[:capacity]
        if tokens.numel() == 0:
            continue
        out_ND = expert_ffn(x_TD[tokens], gate_up_E2FD[e], down_EDF[e], swiglu_limit)
        y_TD = y_TD.index_add(0, tokens, out_ND * weights_TK[tokens, slots, None].to(out_ND.dtype))
    if shared is not None:
        y_TD = y_TD + shared(x_TD)
    return y_TD, logits_TE, experts_TK


def _round_half_away(r):
    """Round to nearest, halves away from zero (C's round()), exactly: r - trunc(r) is
    exact in floating point, unlike r + 0.5."""
    whole = torch.trunc(r)
    return whole + torch.sign(r) * ((r - whole).abs() >= 0.5)


def quantize_int8(x_N, block_size, error_N=None):
    """(q_N int8, scales_B fp32, new_error_N fp32): v = x + error; per block
    scale = max|v| / 127, q = round(v / scale) within +-127; new_error = v - q * scale.
    A block with inf/NaN: scale NaN, q 0, residual 0."""
    v_N = x_N.float() + (error_N.float() if error_N is not None else 0)
    n = v_N.numel()
    n_blocks = -(-n // block_size)
    padded_BX = F.pad(v_N, (0, n_blocks * block_size - n)).view(n_blocks, block_size)
    finite_B = torch.isfinite(padded_BX).all(1)
    scales_B = torch.where(finite_B, padded_BX.abs().amax(1) / 127, math.nan)
    usable_B = finite_B & (scales_B > 0)
    safe_B = torch.where(usable_B, scales_B, 1.0)
    # Clamped: a denormal scale is rounded, and v / scale can pass 127.5.
    level_BX = torch.where(usable_B[:, None],
                           _round_half_away(padded_BX / safe_B[:, None]).clamp(-127, 127), 0.0)
    level_N = level_BX.flatten()[:n]
    new_error_N = v_N - level_N * scales_B.repeat_interleave(block_size)[:n]
    # A non-finite block (an fp16 overflow) leaves a zero residual behind.
    new_error_N = torch.where(finite_B.repeat_interleave(block_size)[:n], new_error_N, 0.0)
    return level_N.to(torch.int8), scales_B, new_error_N


def dequantize_int8(q_RN, scales_RB, block_size):
    """sum over r (in order) of the dequantized rows of q_RN; 1-D inputs are one row."""
    q_RN = q_RN.view(1, -1) if q_RN.dim() == 1 else q_RN
    scales_RB = scales_RB.view(1, -1) if scales_RB.dim() == 1 else scales_RB
    n = q_RN.shape[1]
    sum_N = torch.zeros(n, dtype=torch.float32, device=q_RN.device)
    for r in range(q_RN.shape[0]):
        sum_N += q_RN[r].float() * scales_RB[r].repeat_interleave(block_size)[:n]
    return sum_N
