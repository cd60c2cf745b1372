"""Every CPU kernel against the plain-PyTorch reference, op by op.

``make bench`` times the whole layer; this times each C++ kernel of ``dsv3._C``
(csrc/cpu) through its public op, side by side with the same call on the reference
path (``DSV3_BACKEND=reference``, which the ops read at every call: dsv3/reference.py),
on the same inputs in one process. Before its timings, every case checks that the
kernel's outputs (and, for a backward, the gradients autograd gets through it) agree
with the reference's (benchmarks/bench_checks.py): a row of a wrong kernel says so.
The two paths alternate, a round of calls each, so a change in the machine's load
falls on both. Data-moving ops also get their bytes/s against a measured copy's.

    python -m benchmarks.cpu_kernels [--shape T4096-D512-F256-E64-K8] [--dtypes fp32 bf16]
                                     [--rounds 5] [--calls 10] [--write-results]
"""
import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import dsv3
from benchmarks.bench_checks import check_label, disagreement, gradients, reference_backend
from benchmarks.providers import DTYPES, Shape
from benchmarks.side_by_side import shape_name

DEFAULT_SHAPE = "T4096-D512-F256-E64-K8"
# int8 quantization: the chunks (ranks) a dequantize-sum adds up; --quantize-log2
# sets the values (one fp32 gradient bucket).
QUANTIZE_CHUNKS = 4
# At most this long per round and path, whatever --calls asks (at least one call).
ROUND_S = 1.0


@dataclass
class Case:
    name: str
    dtype: str  # the float inputs' dtype ("fp32" for the router, whatever --dtypes)
    call: Callable[[], object]  # the op(s) timed: outputs, or gradients for a backward
    bytes_moved: int | None = None  # read + written by one call, where data movement bounds it


def _grads(forward: Callable, inputs: list[torch.Tensor], grad_outs: list) -> Callable:
    """A call running ``forward(*inputs)`` and its backward from ``grad_outs`` (None for
    an output without one): bench_checks.gradients, the inputs' gradients."""
    return lambda: gradients(forward, inputs, grad_outs)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def router_cases(shape: Shape) -> list[Case]:
    T, E, K = shape.T, shape.E, shape.K
    logits_TE = torch.randn(T, E)
    bias_E = 0.01 * torch.randn(E)
    groups = 8 if E % 8 == 0 and E // 8 >= 2 else 1
    softmax = lambda logits: dsv3.ops.route(logits, K)  # noqa: E731
    sigmoid = lambda logits: dsv3.ops.route(  # noqa: E731
        logits, K, "sigmoid", bias_E, groups, max(1, groups // 2), True, 2.5)
    weights_TK, experts_TK, counts_E = softmax(logits_TE)
    grad_TK = torch.randn(T, K)
    out_bytes = _nbytes(weights_TK, experts_TK, counts_E)
    return [
        Case("route, softmax", "fp32", lambda: softmax(logits_TE), _nbytes(logits_TE) + out_bytes),
        Case(f"route, sigmoid + bias, {groups} groups", "fp32", lambda: sigmoid(logits_TE),
             _nbytes(logits_TE, bias_E) + out_bytes),
        Case("route_with_stats, softmax", "fp32",
             lambda: dsv3.ops.route_with_stats(logits_TE, K), _nbytes(logits_TE) + out_bytes),
        Case("route, softmax: fwd + bwd", "fp32",
             _grads(softmax, [logits_TE], [grad_TK, None, None])),
    ]


def routed(shape: Shape) -> tuple[torch.Tensor, ...]:
    """A softmax top-k routing of random logits: experts_TK, weights_TK (fp32),
    offsets_E and row_map_TK, as the layer gets them."""
    weights_TK, experts_TK, _ = dsv3.ops.route(torch.randn(shape.T, shape.E), shape.K)
    offsets_E, row_map_TK = dsv3.ops.expert_index(experts_TK, shape.E)
    return experts_TK, weights_TK, offsets_E, row_map_TK


def data_cases(shape: Shape, dtype: torch.dtype, label: str) -> list[Case]:
    T, D, F, E, K = shape.T, shape.D, shape.F, shape.E, shape.K
    S = T * K
    experts_TK, weights_TK, offsets_E, row_map_TK = routed(shape)
    x_TD = torch.randn(T, D, dtype=dtype)
    y_SD = torch.randn(S, D, dtype=dtype)
    grad_TD = torch.randn(T, D, dtype=dtype)
    h_S2F = torch.randn(S, 2 * F, dtype=dtype)
    grad_SF = torch.randn(S, F, dtype=dtype)
    bias_ED = torch.randn(E, D, dtype=dtype)
    index_bytes = _nbytes(row_map_TK)
    unpermute = lambda y, w: dsv3.ops.unpermute(y, row_map_TK, w)  # noqa: E731
    return [
        Case("expert_index", "int32", lambda: dsv3.ops.expert_index(experts_TK, E),
             _nbytes(experts_TK) * 2),
        Case("permute", label, lambda: dsv3.ops.permute(x_TD, experts_TK, E),
             _nbytes(x_TD, experts_TK, y_SD) + index_bytes),
        Case("permute: fwd + bwd", label,
             _grads(lambda x: dsv3.ops.permute(x, experts_TK, E)[0], [x_TD], [y_SD])),
        Case("unpermute", label, lambda: unpermute(y_SD, weights_TK),
             _nbytes(y_SD, weights_TK, x_TD) + index_bytes),
        Case("unpermute: fwd + bwd", label,
             _grads(unpermute, [y_SD, weights_TK], [grad_TD])),
        Case("swiglu", label, lambda: dsv3.ops.swiglu(h_S2F), _nbytes(h_S2F, grad_SF)),
        Case("swiglu: fwd + bwd", label, _grads(dsv3.ops.swiglu, [h_S2F], [grad_SF])),
        Case("gpt_oss_glu", label, lambda: dsv3.ops.gpt_oss_glu(h_S2F, limit=7.0),
             _nbytes(h_S2F, grad_SF)),
        Case("gpt_oss_glu: fwd + bwd", label,
             _grads(lambda h: dsv3.ops.gpt_oss_glu(h, limit=7.0), [h_S2F], [grad_SF])),
        Case("add_expert_bias: fwd + bwd", label,
             _grads(lambda y, b: dsv3.ops.add_expert_bias(y, b, offsets_E), [y_SD, bias_ED],
                    [y_SD])),
    ]


def gemm_cases(shape: Shape, dtype: torch.dtype, label: str) -> list[Case]:
    T, D, F, E, K = shape.T, shape.D, shape.F, shape.E, shape.K
    experts_TK, _, offsets_E, row_map_TK = routed(shape)
    x_TD = torch.randn(T, D, dtype=dtype)
    x_SD = dsv3.ops.permute(x_TD, experts_TK, E)[0]
    w_ED2F = torch.randn(E, D, 2 * F, dtype=dtype) / D ** 0.5
    grad_S2F = torch.randn(T * K, 2 * F, dtype=dtype)
    grouped = lambda x, w: dsv3.ops.grouped_mm(x, w, offsets_E)  # noqa: E731
    gathered = lambda x, w: dsv3.ops.gather_grouped_mm(x, w, offsets_E, row_map_TK)  # noqa: E731
    return [
        Case("grouped_mm, D -> 2F", label, lambda: grouped(x_SD, w_ED2F)),
        Case("grouped_mm: fwd + bwd", label, _grads(grouped, [x_SD, w_ED2F], [grad_S2F])),
        Case("gather_grouped_mm (permute fused)", label, lambda: gathered(x_TD, w_ED2F)),
        Case("gather_grouped_mm: fwd + bwd", label,
             _grads(gathered, [x_TD, w_ED2F], [grad_S2F])),
    ]


def quantize_cases(n_values: int) -> list[Case]:
    x_N = torch.randn(n_values)
    error_N = 1e-3 * torch.randn(n_values)
    q_N, scales_B, new_error_N = dsv3.ops.quantize_int8(x_N, 256, error_N)
    q_RN = q_N.view(QUANTIZE_CHUNKS, -1)
    scales_RB = scales_B.view(QUANTIZE_CHUNKS, -1)
    sum_N = dsv3.ops.dequantize_int8(q_RN, scales_RB, 256)
    return [
        Case("quantize_int8 (error feedback)", "fp32",
             lambda: dsv3.ops.quantize_int8(x_N, 256, error_N),
             _nbytes(x_N, error_N, q_N, scales_B, new_error_N)),
        Case(f"dequantize_int8 ({QUANTIZE_CHUNKS} chunks summed)", "fp32",
             lambda: dsv3.ops.dequantize_int8(q_RN, scales_RB, 256),
             _nbytes(q_RN, scales_RB, sum_N)),
    ]


def copy_bandwidth(calls: int) -> float:
    """Bytes/s of copying a 256 MiB fp32 tensor (read + write counted)."""
    src = torch.randn(1 << 26)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * _nbytes(src) / statistics.median(times)


def _call_times(call: Callable, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _calls_for(first_ms: float, calls: int) -> int:
    """Calls per round for a path whose checking call took ``first_ms``: ``calls``, but
    no more than fill ROUND_S (the reference's per-expert loops run for seconds)."""
    return max(1, min(calls, int(ROUND_S * 1e3 / max(first_ms, 1e-3))))


def measure(case: Case, rounds: int, calls: int, bandwidth: float) -> dict:
    """The case checked against the reference, then timed: ``rounds`` alternations of
    up to ``calls`` calls on each path."""
    first_ms = {}
    start = time.perf_counter()
    got = case.call()
    first_ms["dsv3"] = (time.perf_counter() - start) * 1e3
    with reference_backend():
        start = time.perf_counter()
        want = case.call()
        first_ms["reference"] = (time.perf_counter() - start) * 1e3
    check = check_label(disagreement(got, want))
    times = {"dsv3": [], "reference": []}
    for _ in range(rounds):
        times["dsv3"] += _call_times(case.call, _calls_for(first_ms["dsv3"], calls))
        with reference_backend():
            times["reference"] += _call_times(case.call, _calls_for(first_ms["reference"], calls))
    ms = {path: statistics.median(samples) for path, samples in times.items()}
    row = {"op": case.name, "dtype": case.dtype, "dsv3_ms": ms["dsv3"],
           "reference_ms": ms["reference"], "speedup": ms["reference"] / ms["dsv3"],
           "check": check, "bandwidth_share": None,
           "calls": {path: len(samples) for path, samples in times.items()}}
    if case.bytes_moved is not None:
        row["bandwidth_share"] = case.bytes_moved / (ms["dsv3"] / 1e3) / bandwidth
    return row


def table(rows: list[dict]) -> str:
    lines = ["| op | dtype | dsv3 ms | reference ms | reference/dsv3 | dsv3 bytes/s, "
             "share of copy's | check |", "|---|---|--:|--:|--:|--:|---|"]
    for row in rows:
        share = row["bandwidth_share"]
        share = "" if share is None else "< 0.01" if share < 0.01 else f"{share:.2f}"
        lines.append(f"| {row['op']} | {row['dtype']} | {row['dsv3_ms']:.3f} | "
                     f"{row['reference_ms']:.3f} | {row['speedup']:.2f} | {share} | "
                     f"{row['check']} |")
    return "\n".join(lines)


def cases(shape: Shape, dtype_names: list[str], quantize_values: int) -> list[Case]:
    found = router_cases(shape)
    for name in dtype_names:
        found += data_cases(shape, DTYPES[name], name)
    for name in dtype_names:
        found += gemm_cases(shape, DTYPES[name], name)
    return found + quantize_cases(quantize_values)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=shape_name, default=DEFAULT_SHAPE,
                        help="T<tokens>-D<dim>-F<ffn>-E<experts>-K<top-k>")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternations of the two paths per case")
    parser.add_argument("--calls", type=int, default=10, help="timed calls per round and path")
    parser.add_argument("--quantize-log2", type=int, default=24,
                        help="the int8 cases quantize 2^N fp32 values")
    parser.add_argument("--write-results", action="store_true",
                        help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.calls < 1:
        parser.error("--rounds and --calls must be >= 1")
    if not 10 <= args.quantize_log2 <= 30:  # whole 256-value blocks in each of the chunks
        parser.error("--quantize-log2 must be in [10, 30]")
    from benchmarks.contention import foreign_cores, snapshot
    torch.manual_seed(0)
    shape = Shape.parse(args.shape)
    before = snapshot()
    bandwidth = copy_bandwidth(args.calls)
    rows = []
    quantize_values = 1 << args.quantize_log2
    for case in cases(shape, args.dtypes, quantize_values):
        rows.append(measure(case, args.rounds, args.calls, bandwidth))
        print(f"{case.name} ({case.dtype}): {rows[-1]['speedup']:.2f}x, {rows[-1]['check']}",
              file=sys.stderr)
    foreign = foreign_cores(before, snapshot())
    failed = [row["op"] for row in rows if row["check"] != "ok"]
    fewest = min(n for row in rows for n in row["calls"].values())
    body = (f"Shape {shape.name}; int8 cases on {quantize_values} fp32 values, block 256.\n\n"
            + table(rows)
            + f"\n\n- Medians of {args.rounds} rounds of up to {args.calls} calls per path "
            f"(fewer where a round would pass {ROUND_S:.0f} s; a path's fewest timed "
            f"calls: {fewest}), "
            f"the two paths alternating a round at a time, after a checking call each.\n"
            f"- Copy bandwidth (256 MiB fp32, read + write): {bandwidth / 1e9:.1f} GB/s.\n"
            f"- Other processes used {foreign:.2f} cores on average while this ran.\n")
    print(body)
    if args.write_results:
        from benchmarks.results import append_section, command_line
        append_section("CPU kernels against the reference, op by op",
                       command_line("benchmarks.cpu_kernels", argv), body)
    if failed:
        print(f"wrong results: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
