"""gpu_bench's bandwidth-bound cases: the router (and its variants), permute,
unpermute and its backward, the SwiGLU and GPT-OSS activations and their backwards,
int8 quantize and dequantize-sum, each as achieved bytes/s against the measured copy
bandwidth, and each checked against dsv3/reference.py before it is timed
(bench_checks). The sizes, the device, the bandwidth and the timers are gpu_bench's,
passed in as its module (``bench``): run as ``python -m benchmarks.gpu_bench`` that is
``__main__``, whose settings ``--smoke`` has changed, not a second import of it.
"""
import traceback

import torch

import dsv3
from dsv3.ops.swiglu import GRAD_AT_LIMIT
from benchmarks.bench_checks import (check_label, disagreement, gradients_against_reference,
                                     outputs_against_reference, reference_gradients)


def _router_variant(device, fn, **settings):
    """``fn`` with the Triton router's module settings replaced for the call: e.g.
    _ONE_HOT_COUNTS=0 (one count atomic per copy, its choice for many experts, instead
    of per-program one-hot sums) or _network (whether the top-k takes a bitonic network
    or rounds)."""
    def call():
        if device != "cuda":  # the CPU smoke run takes the C++ router
            return fn()
        from dsv3.kernels import router
        saved = {name: getattr(router, name) for name in settings}
        for name, value in settings.items():
            setattr(router, name, value)
        try:
            return fn()
        finally:
            for name, value in saved.items():
                setattr(router, name, value)
    return call


def _triton_kernel(device, name, *args):
    """A call of dsv3.kernels.permute's Triton kernel ``name`` on ``args`` on a GPU, where
    the op runs the compiled CUDA kernel instead; elsewhere (the CPU smoke run) the op."""
    def call():
        if device != "cuda":
            return getattr(torch.ops.dsv3, name)(*args)
        from dsv3.kernels import permute
        return getattr(permute, name)(*args)
    return call


def memory_rows(bench) -> list[dict]:
    """One row a case: its time (CUDA-graph replays, and eager), its share of the copy
    bandwidth, and its check against the reference."""
    device = bench.DEVICE
    T, D, E, K = (bench.MEMORY_SHAPE[k] for k in "TDEK")
    route_T = bench.MEMORY_SHAPE["route_T"]
    # fp32 logits, as every dsv3 layer routes on (dsv3/moe.py: bf16 ties flip choices)
    logits_TE = torch.randn(route_T, E, device=device)
    bias_E = torch.randn(E, device=device) * 0.01
    x_TD = torch.randn(T, D, device=device, dtype=torch.bfloat16)
    _, experts_TK, _ = dsv3.ops.route(logits_TE[:T], K, "sigmoid", bias_E, 8, 4, True, 2.5)
    weights_TK = torch.rand(T, K, device=device)
    # 1 GiB of fp32 gradients on the GPU
    grad_N = torch.randn(1 << bench.MEMORY_SHAPE["grad_log2"], device=device)
    residual_N = torch.randn_like(grad_N) * 1e-3
    q_8N = torch.randint(-127, 128, (8, 1 << bench.MEMORY_SHAPE["q_log2"]),
                         device=device, dtype=torch.int8)
    scales_8B = torch.rand(8, q_8N.shape[1] // 256, device=device)
    x_SD, offsets_E, row_map_TK = dsv3.ops.permute(x_TD, experts_TK, E)
    route_bytes = route_T * E * 4 + route_T * K * 8  # fp32 logits in; fp32 weights, int32 ids out
    _, route_experts_TK, _ = dsv3.ops.route(logits_TE, K, "sigmoid", bias_E, 8, 4)
    grad_weights_TK = torch.randn(route_T, K, device=device)
    grad_score_sum_E = torch.randn(E, device=device)
    grad_lse_sq = torch.randn((), device=device)
    # fp32 logits in, fp32 d(logits) out (the top-k inputs are small)
    route_backward_bytes = 2 * route_T * E * 4 + route_T * K * 8
    # Mixtral's router (softmax top-2 of 8): little compute a token, so bandwidth-bound.
    mixtral_T = bench.MEMORY_SHAPE["mixtral_route_T"]
    mixtral_logits_TE = torch.randn(mixtral_T, 8, device=device)
    route_shape, rows_shape = f"T{route_T} E{E} K{K}", f"T{T} D{D} E{E} K{K}"
    grad_y_TD = torch.randn_like(x_TD)
    swiglu_S, swiglu_F = bench.MEMORY_SHAPE["swiglu_S"], bench.MEMORY_SHAPE["swiglu_F"]
    h_S2F = torch.randn(swiglu_S, 2 * swiglu_F, device=device, dtype=torch.bfloat16)
    grad_a_SF = torch.randn(swiglu_S, swiglu_F, device=device, dtype=torch.bfloat16)
    swiglu_shape = f"S{swiglu_S} F{swiglu_F}"
    gpt_oss_S, gpt_oss_F = bench.MEMORY_SHAPE["gpt_oss_S"], bench.MEMORY_SHAPE["gpt_oss_F"]
    gate_up_S2F = torch.randn(gpt_oss_S, 2 * gpt_oss_F, device=device,
                              dtype=torch.bfloat16)
    grad_glu_SF = torch.randn(gpt_oss_S, gpt_oss_F, device=device, dtype=torch.bfloat16)
    gpt_oss_shape = f"S{gpt_oss_S} F{gpt_oss_F}"
    cases = [  # (name, shape, call, fewest bytes it must move)
        ("route (sigmoid, 8 groups)", route_shape,
         lambda: dsv3.ops.route(logits_TE, K, "sigmoid", bias_E, 8, 4), route_bytes),
        # The same top-k taken in rounds instead of by the bitonic network: which wins.
        ("route (sigmoid, 8 groups), top-k in rounds", route_shape,
         _router_variant(device, lambda: dsv3.ops.route(logits_TE, K, "sigmoid", bias_E, 8, 4),
                         _network=lambda block_k, slab, merges: False), route_bytes),
        ("route + loss sums", route_shape,
         lambda: dsv3.ops.route_with_stats(logits_TE, K, "sigmoid", bias_E, 8, 4), route_bytes),
        ("route (softmax, Mixtral-like)", f"T{mixtral_T} E8 K2",
         lambda: dsv3.ops.route(mixtral_logits_TE, 2), mixtral_T * (8 * 4 + 2 * 8)),
        # The same with one token a thread (router._widened gives it four): which wins.
        ("route (softmax, Mixtral-like), one token a thread", f"T{mixtral_T} E8 K2",
         _router_variant(device, lambda: dsv3.ops.route(mixtral_logits_TE, 2),
                         _WIDE_MIN_PROGRAMS=1 << 62),
         mixtral_T * (8 * 4 + 2 * 8)),
        # The same with its expert counts by one atomic per copy, as for many experts,
        # instead of per-program one-hot sums: which of the two wins at 8 counters.
        ("route (softmax, Mixtral-like), per-copy count atomics", f"T{mixtral_T} E8 K2",
         _router_variant(device, lambda: dsv3.ops.route(mixtral_logits_TE, 2), _ONE_HOT_COUNTS=0),
         mixtral_T * (8 * 4 + 2 * 8)),
        # The router's backward with all three gradients (weights, score sums, z loss).
        ("route backward (sigmoid, all gradients)", route_shape,
         lambda: torch.ops.dsv3.route_backward(grad_weights_TK, grad_score_sum_E, grad_lse_sq,
                                               logits_TE, route_experts_TK, "sigmoid", True, 2.5),
         route_backward_bytes),
        ("permute", rows_shape, lambda: dsv3.ops.permute(x_TD, experts_TK, E), T * D * 2 * (1 + K)),
        ("unpermute", rows_shape, lambda: dsv3.ops.unpermute(x_SD, row_map_TK, weights_TK),
         T * D * 2 * (K + 1)),
        # Its backward: each copy's gradient (grad_y_TD read, grad_y_SD written) and the
        # routing weights' (y_SD read).
        ("unpermute backward", rows_shape,
         lambda: torch.ops.dsv3.unpermute_backward(grad_y_TD, x_SD, row_map_TK, weights_TK),
         T * D * 2 * (1 + 2 * K)),
        # The same by the Triton kernel (the op runs csrc/cuda's where it was built): the
        # two layouts of one algorithm side by side.
        ("unpermute backward, Triton kernel", rows_shape,
         _triton_kernel(device, "unpermute_backward", grad_y_TD, x_SD, row_map_TK, weights_TK),
         T * D * 2 * (1 + 2 * K)),
        # The layer's elementwise step between its GEMMs, at the Mixtral-like layer's size:
        # h read, a written; backward: grad_a and h read, grad_h written.
        ("swiglu", swiglu_shape, lambda: dsv3.ops.swiglu(h_S2F), h_S2F.numel() * 3),
        ("swiglu backward", swiglu_shape,
         lambda: torch.ops.dsv3.swiglu_backward(grad_a_SF, h_S2F), h_S2F.numel() * 5),
        # GPT-OSS's activation (interleaved gate/up, clamped at its swiglu_limit 7), the
        # same bytes as SwiGLU's.
        ("gpt_oss_glu", gpt_oss_shape, lambda: dsv3.ops.gpt_oss_glu(gate_up_S2F, 1.702, 7.0),
         gate_up_S2F.numel() * 3),
        ("gpt_oss_glu backward", gpt_oss_shape,
         # with the op's convention at the clamp's bounds (a constexpr of the kernel), so
         # the kernel timed is the one its check runs
         lambda: torch.ops.dsv3.gpt_oss_glu_backward(grad_glu_SF, gate_up_S2F, 1.702, 7.0,
                                                     GRAD_AT_LIMIT),
         gate_up_S2F.numel() * 5),
        # Gradient compression: read fp32 values + residual, write int8 + new residual.
        ("quantize_int8 (error feedback)", f"N {grad_N.numel()}",
         lambda: dsv3.ops.quantize_int8(grad_N, 256, residual_N), grad_N.numel() * (4 + 4 + 1 + 4)),
        # Reduce step: W=8 int8 chunks in, one fp32 sum out.
        ("dequantize_int8 (8 chunks summed)", f"8 x N {q_8N.shape[1]}",
         lambda: dsv3.ops.dequantize_int8(q_8N, scales_8B, 256), q_8N.numel() + q_8N.shape[1] * 4),
    ]
    # What each case's call ``fn`` computes, against the reference (bench_checks): the
    # raw backward calls through the public op on the same kernel, with the gradients
    # they are fed.
    def unpermute(y_SD, w_TK):
        return dsv3.ops.unpermute(y_SD, row_map_TK, w_TK)

    checks = {
        "route backward (sigmoid, all gradients)": lambda fn: gradients_against_reference(
            lambda logits: dsv3.ops.route_with_stats(logits, K, "sigmoid", bias_E, 8, 4, True,
                                                     2.5),
            [logits_TE], (grad_weights_TK, None, None, grad_score_sum_E, grad_lse_sq)),
        "unpermute backward": lambda fn: gradients_against_reference(
            unpermute, [x_SD, weights_TK], grad_y_TD),
        # the Triton kernel's (grad_y_SD, grad_weights_TK) against the reference's, not
        # the op's: without csrc/cuda the op is the same kernel
        "unpermute backward, Triton kernel": lambda fn: disagreement(
            fn(), reference_gradients(unpermute, [x_SD, weights_TK], grad_y_TD)),
        "swiglu backward": lambda fn: gradients_against_reference(dsv3.ops.swiglu, [h_S2F],
                                                                  grad_a_SF),
        "gpt_oss_glu backward": lambda fn: gradients_against_reference(
            lambda h: dsv3.ops.gpt_oss_glu(h, 1.702, 7.0), [gate_up_S2F], grad_glu_SF),
    }
    rows = []
    for name, shape, fn, n_bytes in cases:
        try:
            check = checks.get(name, outputs_against_reference)(fn)
            ms = bench.graph_ms(fn)
            rows.append({"bench": name, "shape": shape, "dsv3_ms": ms,
                         "eager_ms": bench.bench_ms(fn),
                         "dsv3_vs_bound": n_bytes / (ms * 1e-3) / bench.BANDWIDTH,
                         "check": check_label(check)})
        except Exception as error:
            # The cases are one job of gpu_bench's: one that raises (a variant that does
            # not compile) would drop every other case's row with it. A lost CUDA context
            # goes up to gpu_bench, which stops the run and resumes it.
            if bench.cuda_lost():
                raise
            traceback.print_exc()
            rows.append({"bench": name, "shape": shape,
                         "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"})
    return rows
