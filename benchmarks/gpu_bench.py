"""GPU benchmarks (run by benchmarks/gpu_check.sh on a lent H200): every kernel
against its physical bound and the strongest peer on the machine, side by side in
one process, as ratios.

- grouped GEMM fwd / dgrad / wgrad: dsv3 (Triton) vs ``torch._grouped_mm`` vs
  dense cuBLAS at the same FLOPs (``torch.mm`` of the stacked rows);
- the permute fused into the first GEMM vs permute then GEMM;
- router (with and without the loss sums), permute, unpermute (and its backward),
  SwiGLU and GPT-OSS's gated activation (and their backwards), int8 quantize and
  dequantize-sum: achieved bytes/s vs the measured copy bandwidth (gpu_bandwidth.py);
- the whole layer fwd+bwd: ``dsv3.MoE`` vs a ``torch._grouped_mm`` layer and the
  reference loop, and both layers' device time op by op (torch.profiler);
- GPT-OSS's MoE block fwd+bwd: dsv3's (``patch_moe``'s GptOssMoE) vs transformers'
  own, with its ``grouped_mm`` experts implementation and its ``eager`` loop.
Timing: ``triton.testing.do_bench`` (CUDA events, median of at least MIN_SAMPLES
calls). Every row says in ``check`` whether what it timed computed the right thing
(benchmarks/bench_checks.py): a GEMM, gather or layer row against the peer's outputs
(the layer's gradients too; ``rel_err`` gives the forward's), the GPT-OSS block's row
by its experts' forward against transformers' (its routing and backward unchecked
there), every other row against dsv3/reference.py. A failed check fails the run (exit
status WRONG_RESULT). JSON and a markdown table are rewritten in --out after every
case, so a run cut short by its time limit still leaves what it measured.
"""
import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import triton

import dsv3
from benchmarks.autotune_report import FORWARD_FLAGS, WGRAD_FLAGS, autotune_picks, tuned_choice
from benchmarks.bench_checks import FLOAT_TOLERANCE, check_label, disagreement
from benchmarks.op_profile import op_times
from benchmarks.providers import Step, grouped_mm_layer, outputs_and_gradients
from dsv3.kernels import autotune_cache, grouped_gemm
from dsv3.kernels import config as kernel_config
from dsv3.ops.permute import invert_row_map

# (name, T, D, F, E, K): routed rows per rank S = T*K spread over E local experts. The
# GEMM is x_SD @ w[e] of D -> 2F, so "mixtral-like" is the layer's first GEMM and
# "mixtral-like down" (D = Mixtral's F, 2F = its D) its second, 14336 -> 4096.
GEMM_SHAPES = [
    ("dsv3-like T4096", 4096, 7168, 2048, 32, 1),   # 256 experts / 8 ranks, K=8: ~T rows locally
    ("dsv3-like T16384", 16384, 7168, 2048, 32, 1),
    ("mixtral-like", 4096, 4096, 14336, 8, 2),
    ("mixtral-like down", 4096, 14336, 2048, 8, 2),
    ("fine E128 F768", 4096, 2048, 768, 128, 8),
    ("fine E512 F256", 4096, 2048, 256, 512, 8),
]
LAYER_SHAPES = [("mixtral-like", 4096, 4096, 14336, 8, 2), ("fine E128 F768", 4096, 2048, 768, 128, 8)]
# GPT-OSS-20B's block: D = F = 2880, 32 experts, top-4.
GPT_OSS_SHAPES = [("gpt-oss-20b-like", 4096, 2880, 2880, 32, 4)]
# GEMM shapes run after the layers: the largest, and none of the layers' own.
LATE_GEMM_SHAPES = ("dsv3-like",)
# The router reads only T·E fp32 logits: at T=16384 that is 16 MB, a few microseconds
# at HBM speed, near a launch's own cost; route_T tokens make its bound measurable.
MEMORY_SHAPE = {"T": 16384, "D": 7168, "E": 256, "K": 8, "route_T": 131072, "grad_log2": 28,
                "q_log2": 25, "mixtral_route_T": 1 << 23,  # 256 MB of 8-expert fp32 logits
                "swiglu_S": 8192, "swiglu_F": 14336,  # the Mixtral-like layer's h_S2F
                # GPT-OSS-120B-like: 16384 routed rows (T 4096, top-4), its F = 2880
                "gpt_oss_S": 16384, "gpt_oss_F": 2880}
COPY_BYTES = 1 << 30
# --smoke: every case on small CPU tensors, to check this script before spending GPU time.
DEVICE = "cuda"
BANDWIDTH = float("nan")  # bytes/s of a device copy, measured first by main()


def use_smoke_sizes() -> None:
    global DEVICE, GEMM_SHAPES, LAYER_SHAPES, GPT_OSS_SHAPES, COPY_BYTES
    DEVICE, COPY_BYTES = "cpu", 1 << 20
    GEMM_SHAPES = [(name, 64, 64, 32, E // 4 or 2, K) for name, _, _, _, E, K in GEMM_SHAPES]
    LAYER_SHAPES = [(name, 64, 64, 32, E // 4 or 2, K) for name, _, _, _, E, K in LAYER_SHAPES]
    GPT_OSS_SHAPES = [(name, 64, 64, 32, 8, K) for name, _, _, _, _, K in GPT_OSS_SHAPES]
    MEMORY_SHAPE.update(T=64, D=64, E=64, route_T=128, grad_log2=12, q_log2=10,
                        mixtral_route_T=256, swiglu_S=64, swiglu_F=32, gpt_oss_S=64,
                        gpt_oss_F=36)


# Timed calls behind each median, however long a call. do_bench times int(rep / its own
# estimate of a call) calls: at rep=40 ms, run 4's 17 ms layer steps were medians of 2
# calls and its 200 ms loops of 1.
MIN_SAMPLES = 10


def bench_ms(fn) -> float:
    if DEVICE == "cpu":  # smoke run: one timed call is enough to exercise the case
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    fn()  # compiled and tuned before the estimate
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    estimate_ms = (time.perf_counter() - start) * 1e3
    # 1.5x: do_bench's estimate, which sizes the count, may come out above this one
    rep_ms = max(40.0, 1.5 * MIN_SAMPLES * estimate_ms)
    return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")


def graph_ms(fn) -> float:
    """Device time of ``fn`` alone: captured once in a CUDA graph and timed by its
    replays, so the Python and launch overhead of a few-microsecond kernel does not
    count as its time (METHOD: many small launches are timed through a graph)."""
    if DEVICE == "cpu":
        return bench_ms(fn)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay)


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write): the HBM bound."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench_ms(lambda: dst.copy_(src)) * 1e-3)


def relative_error(ours: torch.Tensor, peer: torch.Tensor) -> float:
    """||ours - peer|| / ||peer|| in fp32 (bf16 operands, fp32 accumulation: ~1e-3)."""
    diff = (ours.float() - peer.float()).norm()
    return (diff / peer.float().norm().clamp_min(1e-30)).item()


def _error_check(error: float) -> str:
    """A row's check from its relative error against the peer."""
    return check_label(None if error <= FLOAT_TOLERANCE else
                       f"relative error {error:.3g} against the peer > {FLOAT_TOLERANCE}")


def balanced_offsets(n_rows: int, n_experts: int) -> torch.Tensor:
    counts = torch.distributions.Multinomial(n_rows, torch.ones(n_experts)).sample().int()
    return counts.cumsum(0).to(torch.int32).to(DEVICE)


def gemm_rows(name, T, D, F, E, K):
    S = T * K
    x_SD = torch.randn(S, D, device=DEVICE, dtype=torch.bfloat16)
    w_E2FD = torch.randn(E, 2 * F, D, device=DEVICE, dtype=torch.bfloat16) * D ** -0.5
    dy_S2F = torch.randn(S, 2 * F, device=DEVICE, dtype=torch.bfloat16)
    offsets_E = balanced_offsets(S, E)
    dense_D2F = w_E2FD[0].t()
    flops = 2 * S * D * 2 * F
    # Fewest bytes each GEMM must move: its two inputs and its output, once. Every
    # expert's weights are read (fwd, dgrad) or written (wgrad) whole, which the dense
    # GEMM at the same FLOPs does not do: where weights dominate, the floor is HBM's.
    weight_bytes = E * 2 * F * D * 2
    min_bytes = weight_bytes + S * (D + 2 * F) * 2
    cases = {
        "fwd": (lambda: torch.ops.dsv3.grouped_mm(x_SD, w_E2FD.transpose(1, 2), offsets_E),
                lambda: torch._grouped_mm(x_SD, w_E2FD.transpose(1, 2), offs=offsets_E),
                lambda: x_SD @ dense_D2F),
        "dgrad": (lambda: torch.ops.dsv3.grouped_mm(dy_S2F, w_E2FD, offsets_E),
                  lambda: torch._grouped_mm(dy_S2F, w_E2FD, offs=offsets_E),
                  lambda: dy_S2F @ dense_D2F.t()),
        "wgrad": (lambda: torch.ops.dsv3.grouped_mm_wgrad(x_SD, dy_S2F, offsets_E, True),
                  lambda: torch._grouped_mm(dy_S2F.t(), x_SD, offs=offsets_E),
                  lambda: dy_S2F.t() @ x_SD),
    }
    rows = []
    for kind, (ours, peer, dense) in cases.items():
        tuner = grouped_gemm._wgrad_tuned if kind == "wgrad" else grouped_gemm._grouped_mm_tuned
        tuned_before = len(tuner.cache)
        error = relative_error(ours(), peer())
        t_ours, t_peer, t_dense = bench_ms(ours), bench_ms(peer), bench_ms(dense)
        floor_ms = max(t_dense, min_bytes / BANDWIDTH * 1e3)
        rows.append({"bench": f"grouped_mm {kind}", "shape": name, "dsv3_ms": t_ours,
                     "peer_ms": t_peer, "bound_ms": t_dense, "floor_ms": floor_ms,
                     "dsv3_vs_floor": floor_ms / t_ours,
                     "dsv3_tflops": flops / t_ours / 1e9, "dsv3_vs_bound": t_dense / t_ours,
                     "peer_over_dsv3": t_peer / t_ours, "rel_err": error,
                     "check": _error_check(error)})
        if DEVICE == "cuda":  # the CPU smoke run takes the C++ kernels
            rows[-1].update(tuned_choice(tuner, tuned_before, WGRAD_FLAGS if kind == "wgrad"
                                         else FORWARD_FLAGS))
    return rows


# The flags of the kernels' variants: names of a launch with the flag set and unset.
def gather_rows(name, T, D, F, E, K):
    """The permute fused into the first GEMM (and into its weight gradient) vs
    permute_rows then the plain op: does skipping the write and re-read of x_SD win at
    this shape?"""
    x_TD = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16)
    w_E2FD = torch.randn(E, 2 * F, D, device=DEVICE, dtype=torch.bfloat16) * D ** -0.5
    experts_TK = torch.rand(T, E, device=DEVICE).argsort(1)[:, :K].to(torch.int32)
    offsets_E, row_map_TK = dsv3.ops.expert_index(experts_TK, E)
    w_ED2F = w_E2FD.transpose(1, 2)
    error = relative_error(
        dsv3.ops.gather_grouped_mm(x_TD, w_ED2F, offsets_E, row_map_TK),
        torch._grouped_mm(torch.ops.dsv3.permute_rows(x_TD, row_map_TK), w_ED2F, offs=offsets_E))
    rows = [_fused_vs_unfused(
        "gather+grouped_mm fwd (peer: permute then GEMM)", name, error,
        lambda: dsv3.ops.gather_grouped_mm(x_TD, w_ED2F, offsets_E, row_map_TK),
        lambda: torch.ops.dsv3.grouped_mm(torch.ops.dsv3.permute_rows(x_TD, row_map_TK), w_ED2F,
                                          offsets_E))]
    # The same for the first GEMM's weight gradient: rows read through token_S (in the
    # kernel where X > Y, as at E=128; copied first where X <= Y, as at Mixtral's) against
    # the permuted copy's plain wgrad. Its token reads kept the loop from pipelining
    # before run 5 (grouped_gemm_kernels._PTX_TOKEN_LOADS).
    token_S = invert_row_map("gpu_bench", row_map_TK)
    dy_S2F = torch.randn(T * K, 2 * F, device=DEVICE, dtype=torch.bfloat16)

    def fused_wgrad():
        return torch.ops.dsv3.grouped_mm_wgrad(x_TD, dy_S2F, offsets_E, True, token_S)

    def unfused_wgrad():
        return torch.ops.dsv3.grouped_mm_wgrad(torch.ops.dsv3.permute_rows(x_TD, row_map_TK),
                                               dy_S2F, offsets_E, True)

    rows.append(_fused_vs_unfused("gathered wgrad (peer: permute then wgrad)", name,
                                  relative_error(fused_wgrad(), unfused_wgrad()), fused_wgrad,
                                  unfused_wgrad))
    return rows


def _fused_vs_unfused(bench: str, shape: str, error: float, fused, unfused) -> dict:
    """A row timing ``fused`` against ``unfused``, both through CUDA graphs, so that the
    ops' host work (checks, the row map's inversion: a few launches) does not count as
    kernel time; eager_ms is the plain call. Run 4 timed the fused forward plainly at
    0.675 ms at E=128 against 0.465 ms unfused, where run 2 had 0.48 against 0.50: the
    graph tells host from kernel."""
    fused_ms, unfused_ms = graph_ms(fused), graph_ms(unfused)
    return {"bench": bench, "shape": shape, "dsv3_ms": fused_ms, "eager_ms": bench_ms(fused),
            "peer_ms": unfused_ms, "peer_over_dsv3": unfused_ms / fused_ms, "rel_err": error,
            "check": _error_check(error)}


def memory_rows():
    """The bandwidth-bound cases (gpu_bandwidth.py), with this module's settings."""
    from benchmarks import gpu_bandwidth
    return gpu_bandwidth.memory_rows(sys.modules[__name__])


def layer_steps(T, D, F, E, K):
    """One forward+backward step of dsv3.MoE, of the ``torch._grouped_mm`` layer and of
    the reference loop on the same weights; the relative error of the forwards, and the
    check of the forward and the gradients against the peer's."""
    moe = dsv3.MoE(dsv3.MoEConfig(dim=D, ffn_dim=F, n_experts=E, top_k=K, aux_loss_coef=0.0),
                   device=DEVICE, dtype=torch.bfloat16)
    x_TD = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    grad_TD = torch.randn_like(x_TD)
    weights = [moe.router.weight, moe.gate_up_proj, moe.down_proj]
    ours, peer, loop = (Step(forward, grad_TD, [x_TD, *weights]) for forward in (
        lambda: moe(x_TD), lambda: grouped_mm_layer(x_TD, *weights, K),
        lambda: dsv3.reference.moe(x_TD, *weights, top_k=K)[0]))
    ours_out, peer_out = outputs_and_gradients(ours), outputs_and_gradients(peer)
    error = relative_error(ours_out[0], peer_out[0])
    # the forward and every gradient (x, router, gate/up, down) against the peer's
    check = check_label(disagreement(ours_out, peer_out))
    return ours, peer, loop, error, check


def layer_rows(name, T, D, F, E, K):
    ours, peer, loop, error, check = layer_steps(T, D, F, E, K)
    t_ours, t_peer, t_loop = bench_ms(ours), bench_ms(peer), bench_ms(loop)
    row = {"bench": "layer fwd+bwd", "shape": name, "dsv3_ms": t_ours, "peer_ms": t_peer,
           "loop_ms": t_loop, "peer_over_dsv3": t_peer / t_ours, "loop_over_dsv3": t_loop / t_ours,
           "rel_err": error, "check": check}
    # dsv3's step replayed from a CUDA graph (it makes no host sync): its kernels' time
    # without the host's, to tell whether the eager step keeps the GPU busy. Last, and
    # a failed capture leaves the eager figures standing.
    try:
        row["graph_ms"] = graph_ms(ours)
    except RuntimeError as capture_error:
        row["graph_ms"] = f"capture failed: {str(capture_error)[:60]}"
    return [row]


def gpt_oss_rows(name, T, D, F, E, K):
    """GPT-OSS's block (biased experts, interleaved gate/up, its clamped activation)
    fwd+bwd in bf16: dsv3's GptOssMoE against transformers' GptOssMLP on the same
    modules, its experts run by transformers' ``grouped_mm`` (the peer) and ``eager``
    (its loop over experts, the reference)."""
    import transformers
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    from dsv3.integrations.transformers.gpt_oss import GptOssMoE, experts_forward
    config = transformers.GptOssConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                                       num_experts_per_tok=K)
    hf_block = GptOssMLP(config).to(device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        for param in hf_block.parameters():  # torch.empty until a model's init runs
            param.normal_(0.0, 0.02)
    ours = GptOssMoE.from_module(hf_block)
    x_1TD = torch.randn(1, T, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    grad_1TD = torch.randn_like(x_1TD)
    leaves = [x_1TD, *hf_block.parameters()]

    def hf(implementation):
        def forward():
            hf_block.experts.config._experts_implementation = implementation
            return hf_block(x_1TD)[0]
        return forward

    def step(forward):
        def run():
            for leaf in leaves:
                leaf.grad = None
            forward().backward(grad_1TD)
        return run

    # Checked on the experts alone, both given HF's routing: the blocks' outputs differ
    # more (about 5%) where fp32 and bf16 router logits choose different experts at
    # near-ties, which would hide a kernel error. The output and the gradients of x and
    # of every experts' Parameter (the biases too) are compared with the peer's.
    with torch.no_grad():
        x_TD = x_1TD.detach().reshape(T, D)
        _, scores_TK, experts_TK = hf_block.router(x_TD)
    hf_block.experts.config._experts_implementation = "grouped_mm"
    grad_TD = grad_1TD.reshape(T, D)

    def experts_result(forward):
        x = x_TD.clone().requires_grad_()
        params = list(hf_block.experts.parameters())
        y_TD = forward(x)
        return [y_TD.detach(), *torch.autograd.grad(y_TD, [x, *params], grad_TD)]

    got = experts_result(lambda x: experts_forward(hf_block.experts, x,
                                                   experts_TK.to(torch.int32), scores_TK))
    want = experts_result(lambda x: hf_block.experts(x, experts_TK, scores_TK))
    error = relative_error(got[0], want[0])
    problem = disagreement(got, want)
    t_ours = bench_ms(step(lambda: ours(x_1TD)[0]))
    t_peer, t_loop = bench_ms(step(hf("grouped_mm"))), bench_ms(step(hf("eager")))
    return [{"bench": "gpt-oss block fwd+bwd", "shape": name, "dsv3_ms": t_ours,
             "peer_ms": t_peer, "loop_ms": t_loop, "peer_over_dsv3": t_peer / t_ours,
             "loop_over_dsv3": t_loop / t_ours, "rel_err": error,
             "check": check_label(problem and f"experts against the peer's: {problem}")}]


def profile_rows(name, T, D, F, E, K):
    """Where a layer step's device time goes, op by op, for dsv3.MoE and the
    ``torch._grouped_mm`` layer: which of dsv3's kernels a slower layer loses on."""
    ours, peer, *_ = layer_steps(T, D, F, E, K)
    on_gpu = DEVICE == "cuda"
    return (op_times("device time by op, dsv3 layer fwd+bwd", name, ours, on_gpu)
            + op_times("device time by op, _grouped_mm layer fwd+bwd", name, peer, on_gpu))


MAIN_COLUMNS = ["bench", "shape", "dsv3_ms", "eager_ms", "graph_ms", "peer_ms", "bound_ms",
                "floor_ms", "loop_ms", "dsv3_tflops", "dsv3_vs_bound", "dsv3_vs_floor", "peer_over_dsv3",
                "loop_over_dsv3", "rel_err", "check", "config", "tma_over_pointer",
                "persistent_over_grid",
                "flat_over_nested",
                "variants", "error"]
PROFILE_COLUMNS = ["bench", "shape", "op", "ms_per_step", "calls", "share", "variants"]


def markdown(rows, header) -> str:
    """The figures as a table, and the op profiles (profile_rows) as a second one."""
    profiles = [r for r in rows if "op" in r]
    text = header + "\n\n" + _table([r for r in rows if "op" not in r], MAIN_COLUMNS)
    if profiles:
        text += "\nWhere a layer step's device time goes:\n\n" + _table(profiles, PROFILE_COLUMNS)
    return text


def _table(rows, columns) -> str:
    used = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(used) + " |", "|" + "---|" * len(used)]
    for r in rows:
        cells = [f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in used]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# Exit status after a case lost the CUDA context (an illegal address or a device-side
# assert is sticky: every later CUDA call fails). gpu_check.sh then runs the cases
# left in a fresh process with DSV3_GEMM_VARIANTS=0 and --resume.
CUDA_LOST = 3
# Exit status when every case ran but some computed a wrong result (their rows' check).
WRONG_RESULT = 4


def cuda_lost() -> bool:
    """Whether the CUDA context is unusable, after a case raised."""
    if DEVICE != "cuda":
        return False
    try:
        torch.cuda.synchronize()
        torch.ones(1, device=DEVICE).add_(1).item()
        return False
    except Exception:  # whatever the torch version's CUDA error class
        return True


def stop_for_lost_context() -> None:
    """Exit with CUDA_LOST now. Not sys.exit: tearing down a broken CUDA context at
    interpreter exit may abort, and gpu_check.sh resumes on this status alone."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(CUDA_LOST)


def jobs():
    """(job id, job, shape), cheapest and most asked-for first, so a run cut short
    loses the least: the bandwidth-bound kernels, the GEMMs of the layers' shapes and
    the fine-grained ones, the layers, their op profiles, then the DeepSeek-V3 GEMMs."""
    early = [s for s in GEMM_SHAPES if not s[0].startswith(LATE_GEMM_SHAPES)]
    late = [s for s in GEMM_SHAPES if s[0].startswith(LATE_GEMM_SHAPES)]
    listed = ([(memory_rows, None)] + [(gemm_rows, s) for s in early]
              + [(layer_rows, s) for s in LAYER_SHAPES] + [(gpt_oss_rows, s) for s in GPT_OSS_SHAPES]
              + [(gather_rows, s) for s in LAYER_SHAPES]
              + [(profile_rows, s) for s in LAYER_SHAPES] + [(gemm_rows, s) for s in late])
    return [(f"{job.__name__} {shape[0]}" if shape else job.__name__, job, shape)
            for job, shape in listed]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no new case after this many seconds")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU: checks the script, measures nothing")
    parser.add_argument("--resume", action="store_true",
                        help="keep --out's rows and run only the cases it has not done, "
                             "skipping any that lost the CUDA context with these variants")
    args = parser.parse_args(argv)
    # Every config timed afresh, none taken from an earlier process's picks: the rows
    # report this run's tuning.
    autotune_cache.ENABLED = False
    if args.smoke:
        use_smoke_sizes()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.manual_seed(0)
    global BANDWIDTH
    BANDWIDTH = copy_bandwidth()
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (smoke run)"
    header = (f"GPU benchmarks on {device_name} · torch {torch.__version__} · "
              f"triton {triton.__version__} · copy bandwidth {BANDWIDTH / 1e12:.2f} TB/s · "
              f"{platform.node()}")
    state = {"header": header, "rows": [], "done": [], "failed": [], "lost": []}
    if args.resume and (args.out / "gpu_bench.json").is_file():
        state = {**state, **json.loads((args.out / "gpu_bench.json").read_text())}
    rows = state["rows"]
    # Rows of a run without the GEMMs' TMA and persistent variants say so.
    variants = {} if kernel_config.VARIANTS else {"variants": "off"}
    variants_label = "off" if variants else "on"

    def save():
        (args.out / "gpu_bench.json").write_text(json.dumps(state, indent=1))
        (args.out / "gpu_bench.md").write_text(markdown(rows, state["header"]))

    def add_autotune_picks():
        if DEVICE == "cuda":  # the CPU smoke run takes the C++ kernels: no tuner ran
            rows.extend({**row, **variants} for row in autotune_picks())

    save()  # the header at once: a first case cut short or hung still leaves both files
    for job_id, job, shape in jobs():
        # A resumed run (other variants) tries again what failed or lost the context.
        tried = f"{job_id} ({variants_label})"
        if job_id in state["done"] or tried in state["failed"] or tried in state["lost"]:
            continue
        if time.perf_counter() - start > args.budget_s:
            rows.append({"bench": job_id, **variants,
                         "error": f"not run: over the {args.budget_s:.0f} s budget"})
            continue
        try:
            rows += [{**row, **variants} for row in (job(*shape) if shape else job())]
            state["done"].append(job_id)
        except KeyboardInterrupt:  # gpu_check.sh's time limit: say where, keep the picks
            rows.append({"bench": job_id, **variants, "error": "stopped at the time limit"})
            add_autotune_picks()
            save()
            raise
        except Exception as error:  # one failing case must not hide the others' figures
            rows.append({"bench": job_id, **variants,
                         "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"})
            traceback.print_exc()
            if cuda_lost():
                state["lost"].append(tried)
                add_autotune_picks()  # the tuners' caches: host memory, no CUDA call
                save()
                print(f"[{time.perf_counter() - start:.0f} s] CUDA context lost in {job_id}")
                stop_for_lost_context()
            state["failed"].append(tried)
        print(f"[{time.perf_counter() - start:.0f} s] {rows[-1]}", flush=True)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        save()
    add_autotune_picks()
    save()
    print(markdown(rows, state["header"]))
    wrong = [f"{row['bench']} {row.get('shape', '')}: {row['check']}" for row in rows
             if str(row.get("check", "")).startswith("FAILED")]
    if wrong:
        print("\n".join(["Computed a wrong result (their timings are no figures):", *wrong]),
              file=sys.stderr)
        sys.exit(WRONG_RESULT)


if __name__ == "__main__":
    main()
