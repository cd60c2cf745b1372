"""Where a step's device time goes, op by op: torch.profiler's view of one
forward+backward, as benchmark rows (benchmarks/gpu_bench.py's layer profiles).
Triton names every launch of a kernel alike, so the rows are keyed by the op that
launched the kernels and its input shapes, which tell a layer's GEMMs and their
passes apart."""
import torch

# Ops listed per profiled step, the longest first; the rest are summed in one row.
PROFILE_TOP = 16


def op_times(bench: str, shape: str, step, on_gpu: bool, steps: int = 3) -> list[dict]:
    """Rows of ``step``'s device time (``on_gpu``; else its CPU time) per op and input
    shapes, averaged over ``steps`` profiled steps after a warm-up one. Each op counts
    the kernels it launched itself (self time), so nothing is counted twice."""
    step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as profile:
        for _ in range(steps):
            step()
        if on_gpu:
            torch.cuda.synchronize()
    times = {}
    for event in profile.key_averages(group_by_input_shape=True):
        us = (getattr(event, "self_device_time_total", 0) if on_gpu
              else event.self_cpu_time_total)
        if us > 0:
            op = f"{event.key} {event.input_shapes}"[:120]
            ms, calls = times.get(op, (0.0, 0))
            times[op] = (ms + us / 1e3 / steps, calls + event.count // steps)
    ranked = sorted(times.items(), key=lambda item: -item[1][0])
    total = sum(ms for _, (ms, _) in ranked)
    if total == 0:
        raise RuntimeError(f"the profiler recorded no {'device' if on_gpu else 'CPU'} time")
    rows = [{"bench": bench, "shape": shape, "op": op, "ms_per_step": ms,
             "calls": calls, "share": ms / total} for op, (ms, calls) in ranked[:PROFILE_TOP]]
    rest = ranked[PROFILE_TOP:]
    if rest:
        ms = sum(ms for _, (ms, _) in rest)
        rows.append({"bench": bench, "shape": shape, "op": f"({len(rest)} others)",
                     "ms_per_step": ms, "calls": sum(c for _, (_, c) in rest), "share": ms / total})
    rows.append({"bench": bench, "shape": shape, "op": "(total)", "ms_per_step": total,
                 "calls": sum(c for _, (_, c) in ranked), "share": 1.0})
    return rows
