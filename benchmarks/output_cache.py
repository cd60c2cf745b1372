"""dsv3's CPU output cache (csrc/cpu/alloc.h) on and off, side by side: the layer
step's time and the memory it costs, for the layer benchmark's shapes.

Each (shape, dtype, setting) runs in a fresh process, the two settings alternating
``--rounds`` times, so a drift of the machine falls on both. Per setting the table
gives the median and mean step time over every round's steps, the share of steps
over 1.6x the fastest (the occasional slow steps that fresh mappings gave on the
2-core VM), and the peak extra memory of one step in a fresh process
(benchmarks/memory.py's method). "on" is the default (DSV3_CPU_CACHE_MB unset),
"off" is DSV3_CPU_CACHE_MB=0.

    python -m benchmarks.output_cache [--shapes T4096-D512-F1024-E8-K2 ...]
                                      [--dtypes fp32 bf16] [--steps 30] [--rounds 2]
                                      [--write-results]
"""
import statistics

from benchmarks.side_by_side import peak_mib, step_times

SLOW_FACTOR = 1.6
VARIABLE = "DSV3_CPU_CACHE_MB"
SETTINGS = {"on": None, "off": "0"}


def measure(shape: str, dtype: str, steps: int, rounds: int) -> dict:
    times = {setting: [] for setting in SETTINGS}
    for _ in range(rounds):
        for setting in SETTINGS:
            times[setting] += step_times(VARIABLE, SETTINGS[setting], shape, dtype, steps)
    row = {"shape": shape, "dtype": dtype}
    for setting, values in times.items():
        fastest = min(values)
        row[setting] = {"median_ms": statistics.median(values), "mean_ms": statistics.mean(values),
                        "slow_share": sum(v > SLOW_FACTOR * fastest for v in values) / len(values),
                        "peak_mib": peak_mib(VARIABLE, SETTINGS[setting], shape, dtype)}
    return row


def table(rows: list[dict]) -> str:
    lines = ["| shape | dtype | median ms on / off | mean ms on / off | off/on (mean) | "
             f"steps > {SLOW_FACTOR}x fastest, on / off | peak MiB on / off |",
             "|---|---|--:|--:|--:|--:|--:|"]
    for row in rows:
        on, off = row["on"], row["off"]
        lines.append(f"| {row['shape']} | {row['dtype']} | {on['median_ms']:.1f} / "
                     f"{off['median_ms']:.1f} | {on['mean_ms']:.1f} / {off['mean_ms']:.1f} | "
                     f"{off['mean_ms'] / on['mean_ms']:.2f} | {on['slow_share']:.0%} / "
                     f"{off['slow_share']:.0%} | {on['peak_mib']:.1f} / {off['peak_mib']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    from benchmarks import side_by_side
    from benchmarks.providers import DTYPES
    args = side_by_side.parse(__doc__.split("\n\n")[0], argv, list(DTYPES))
    side_by_side.run(args, measure, table, "; peak: one step in a fresh process "
                     "(benchmarks/memory.py)", "CPU output cache on and off",
                     "benchmarks.output_cache", argv)


if __name__ == "__main__":
    main()
