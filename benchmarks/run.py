"""``make bench``: time every provider, measure its memory, print the ratio table.

    python -m benchmarks.run [--shapes T4096-D512-F1024-E8-K2 ...] [--dtypes fp32 bf16]
                             [--write-results]

Timings come from the pytest-benchmark suite (benchmarks/test_layer.py, run as a
subprocess with --benchmark-json), peak memory from benchmarks/memory.py (a fresh
process per case). The table reports ratios within this one run, since the
machines are shared and absolute times drift between runs.
It goes to stdout, bench-out/layer.md and bench-out/layer.json; --write-results
also appends it, with machine, date and commit, to benchmarks/RESULTS.md.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks import contention, memory
from benchmarks.providers import DTYPES, PROVIDERS, SHAPES, Shape, unavailable_reason
from benchmarks.results import append_text

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench-out"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
# The target: dsv3 fwd+bwd <= 1.25x the dense FFN of the same GEMM FLOPs (a
# reference point, not a floor: see providers.py).
DENSE_TARGET = 1.25
# Foreign load (cores) above which the timings are flagged as taken on a busy machine.
CONTENDED_CORES = 0.1


def run_timings(shape_names: list[str], dtype_names: list[str]) -> dict[tuple, dict]:
    """pytest-benchmark's stats (median seconds, rounds, ...) per (shape, dtype,
    provider), from one run of the suite."""
    json_path = OUT_DIR / "layer-pytest-benchmark.json"
    env = {**os.environ, "DSV3_BENCH_SHAPES": ",".join(shape_names),
           "DSV3_BENCH_DTYPES": ",".join(dtype_names)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "benchmarks/test_layer.py",
         f"--benchmark-json={json_path}", "--benchmark-columns=min,median,max,iqr,rounds"],
        cwd=ROOT, env=env)
    if result.returncode != 0:
        sys.exit(f"benchmarks/test_layer.py failed (pytest exit code {result.returncode})")
    benchmarks = json.loads(json_path.read_text())["benchmarks"]
    return {(b["extra_info"]["shape"], b["extra_info"]["dtype"], b["extra_info"]["provider"]):
            b["stats"] for b in benchmarks}


def run_memory(shape_names: list[str], dtype_names: list[str]) -> dict[tuple, float]:
    """Peak extra MiB per available (shape, dtype, provider)."""
    peaks = {}
    for shape_name in shape_names:
        for dtype_name in dtype_names:
            for provider in PROVIDERS:
                if unavailable_reason(provider, DTYPES[dtype_name]) is None:
                    peaks[shape_name, dtype_name, provider] = memory.peak_extra_mib(
                        shape_name, dtype_name, provider)
            print(f"memory {shape_name} {dtype_name}: done", flush=True)
    return peaks


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or denominator is None else numerator / denominator


def build_rows(shape_names, dtype_names, stats, peaks_mib) -> list[dict]:
    rows = []
    for shape_name in shape_names:
        for dtype_name in dtype_names:
            case_stats = {p: stats.get((shape_name, dtype_name, p)) for p in PROVIDERS}
            ms = {p: None if s is None else s["median"] * 1e3 for p, s in case_stats.items()}
            rows.append({
                "shape": shape_name, "dtype": dtype_name,
                "gflop": Shape.parse(shape_name).flops / 1e9,
                "median_ms": ms,
                "rounds": {p: None if s is None else s["rounds"] for p, s in case_stats.items()},
                "peak_extra_mib": {p: peaks_mib.get((shape_name, dtype_name, p)) for p in PROVIDERS},
                "dsv3/dense": _ratio(ms["dsv3"], ms["dense"]),
                "reference/dsv3": _ratio(ms["reference"], ms["dsv3"]),
                "grouped_mm/dsv3": _ratio(ms["grouped_mm"], ms["dsv3"]),
            })
    return rows


def _cell(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _verdict(ok: bool | None) -> str:
    return "" if ok is None else (" ✓" if ok else " ✗")


def markdown_table(rows: list[dict], contended: bool = False) -> str:
    """The table; on a contended run the timing ratios get no ✓/✗: the providers were
    timed one after another, each under the load of its own moment."""
    lines = [
        "| shape | dtype | GFLOP | dsv3 ms | reference ms | grouped_mm ms | dense ms "
        f"| dsv3/dense (≤ {DENSE_TARGET}) | reference/dsv3 | grouped_mm/dsv3 "
        "| peak MiB dsv3 | peak MiB reference | peak MiB grouped_mm |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        ms, mib, bound = row["median_ms"], row["peak_extra_mib"], row["dsv3/dense"]
        memory_ok = (None if mib["dsv3"] is None or mib["reference"] is None
                     else mib["dsv3"] <= mib["reference"])
        lines.append(
            f"| {row['shape']} | {row['dtype']} | {row['gflop']:.1f} "
            + "".join(f"| {_cell(ms[p], 1)} " for p in PROVIDERS)
            # judged as shown: 1.2504 prints 1.25 and meets the target
            + f"| {_cell(bound, 2)}"
            f"{_verdict(None if bound is None or contended else round(bound, 2) <= DENSE_TARGET)} "
            f"| {_cell(row['reference/dsv3'], 2)} | {_cell(row['grouped_mm/dsv3'], 2)} "
            f"| {_cell(mib['dsv3'], 1)}{_verdict(memory_ok)} | {_cell(mib['reference'], 1)} "
            f"| {_cell(mib['grouped_mm'], 1)} |")
    return "\n".join(lines)


def machine() -> dict:
    with open("/proc/cpuinfo") as cpuinfo:
        models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return {"cpu": models[0] if models else "unknown", "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def git_commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    # Untracked files count as dirty too: a new source file changes what was built.
    return git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain") else "")


def report(rows, info, dtype_names) -> str:
    m = info["machine"]
    rounds = sorted({n for row in rows for n in row["rounds"].values() if n is not None})
    rounds_range = f"{rounds[0]}-{rounds[-1]}" if len(rounds) > 1 else "".join(map(str, rounds))
    foreign = info["foreign_cores"]
    contended = foreign > CONTENDED_CORES
    notes = [f"- Times: medians of {rounds_range} timed rounds per case, after >= 2 s of "
             "warm-up calls; one round = forward + backward. Ratios "
             "compare providers within this run.",
             f"- Other processes used {foreign:.2f} cores on average while the timings ran"
             + (": **contended run**: each provider was timed under the load of its own "
                "moment, so its ratios may be off either way; no ✓/✗ on them."
                if contended else " (quiet)."),
             "- dense: the same GEMM FLOPs as one dense SwiGLU FFN (two large GEMMs, the "
             "SwiGLU unfused): a reference point, not a floor.",
             f"- Peak MiB: VmHWM - VmRSS over one step in a fresh process (a "
             f"{memory.CALIBRATION_MIB} MiB tensor reads as {info['memory_calibration_mib']:.1f} "
             "MiB); ✓ when dsv3 peaks at or below the reference loop."]
    for provider in PROVIDERS:
        for dtype_name in dtype_names:
            reason = unavailable_reason(provider, DTYPES[dtype_name])
            if reason:
                notes.append(f"- {provider} {dtype_name}: n/a, {reason}")
    return "\n".join([
        f"## {info['date']} · commit {info['commit']}", "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads, "
        f"{m['cpu_capability']}), torch {m['torch']}. Wall time of the run: "
        f"{info['wall_s'] / 60:.1f} min.", "",
        markdown_table(rows, contended), "", *notes, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=[s.name for s in SHAPES],
                        help="shape names like T4096-D512-F1024-E8-K2 (default: the issue's three)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--write-results", action="store_true",
                        help=f"append the section to {RESULTS_MD.relative_to(ROOT)}")
    args = parser.parse_args()
    shape_names = [Shape.parse(name).name for name in args.shapes]  # fail early on a typo
    started = time.monotonic()
    OUT_DIR.mkdir(exist_ok=True)

    before = contention.snapshot()
    stats = run_timings(shape_names, args.dtypes)
    foreign_cores = contention.foreign_cores(before, contention.snapshot())
    peaks_mib = run_memory(shape_names, args.dtypes)
    calibration_mib = memory.calibration_mib()
    rows = build_rows(shape_names, args.dtypes, stats, peaks_mib)
    info = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git_commit(), "machine": machine(),
            "wall_s": time.monotonic() - started, "foreign_cores": foreign_cores,
            "memory_calibration_mib": calibration_mib}
    section = report(rows, info, args.dtypes)

    print("\n" + section)
    (OUT_DIR / "layer.md").write_text(section)
    (OUT_DIR / "layer.json").write_text(json.dumps({**info, "rows": rows}, indent=2) + "\n")
    if args.write_results:
        append_text(section)


if __name__ == "__main__":
    main()
