"""The router's backward in the layer's dtype (dsv3/ops/router_logits.py) against the
fp32 backward it replaced (``F.linear`` on fp32 copies of x and the weight), side by
side: the layer step's time and the bytes autograd keeps for the backward.

Each (shape, dtype, setting) runs in a fresh process, the settings alternating
``--rounds`` times, so a drift of the machine falls on both. "fp32" swaps the old
router back into dsv3.moe for that process only. Saved bytes: what one forward keeps
for the backward (dsv3.train.metrics.saved_activation_bytes, parameters left out).

    python -m benchmarks.router_backward [--shapes T4096-D512-F256-E64-K2 ...]
                                         [--dtypes bf16] [--steps 30] [--rounds 2]
                                         [--write-results]
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

SETTINGS = ("layer dtype", "fp32")


def _child(shape: str, dtype: str, steps: int, setting: str) -> None:
    """Times ``steps`` layer steps after a warm-up; prints them (ms) and the saved
    bytes of one forward as JSON."""
    import torch.nn.functional as F

    import dsv3.moe
    from benchmarks.providers import DTYPES, Shape, make_step
    from dsv3.train.metrics import saved_activation_bytes
    if setting == "fp32":
        dsv3.moe.router_logits = lambda x, w, dtype: F.linear(x.to(dtype), w.to(dtype))
    step = make_step("dsv3", Shape.parse(shape), DTYPES[dtype])
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    counter = [0]
    with saved_activation_bytes(counter):
        step.forward()
    print(json.dumps({"times": times, "saved": counter[0]}))


def _run(shape: str, dtype: str, steps: int, setting: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.router_backward", "--child", shape, dtype,
               str(steps), setting]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def measure(shape: str, dtype: str, steps: int, rounds: int) -> dict:
    times, saved = {s: [] for s in SETTINGS}, {}
    for _ in range(rounds):
        for setting in SETTINGS:
            out = _run(shape, dtype, steps, setting)
            times[setting] += out["times"]
            saved[setting] = out["saved"]
    return {"shape": shape, "dtype": dtype,
            **{s: {"median_ms": statistics.median(times[s]), "saved_mib": saved[s] / 2**20}
               for s in SETTINGS}}


def table(rows: list[dict]) -> str:
    new, old = SETTINGS
    lines = [f"| shape | dtype | median ms, {new} / {old} | {old}/{new} | saved MiB, "
             f"{new} / {old} |", "|---|---|--:|--:|--:|"]
    for row in rows:
        a, b = row[new], row[old]
        lines.append(f"| {row['shape']} | {row['dtype']} | {a['median_ms']:.1f} / "
                     f"{b['median_ms']:.1f} | {b['median_ms'] / a['median_ms']:.2f} | "
                     f"{a['saved_mib']:.1f} / {b['saved_mib']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    from benchmarks.output_cache import _shape_name
    from benchmarks.providers import DTYPES, SHAPES
    if argv is None and sys.argv[1:2] == ["--child"]:
        _child(*sys.argv[2:4], int(sys.argv[4]), sys.argv[5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=[shape.name for shape in SHAPES],
                        type=_shape_name,
                        help="layer shapes, T<tokens>-D<dim>-F<ffn>-E<experts>-K<top-k>")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16"])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per setting")
    parser.add_argument("--write-results", action="store_true",
                        help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1")
    from benchmarks.contention import foreign_cores, snapshot
    before = snapshot()
    rows = [measure(shape, dtype, args.steps, args.rounds)
            for shape in args.shapes for dtype in args.dtypes]
    foreign = foreign_cores(before, snapshot())
    body = (table(rows) + f"\n\n- {args.rounds} processes per setting, alternating, "
            f"{args.steps} timed steps each after 3 warm-up steps.\n- Other processes used "
            f"{foreign:.2f} cores on average while this ran.\n")
    print(body)
    if args.write_results:
        from benchmarks.results import append_section, command_line
        append_section("Router backward in the layer's dtype against fp32",
                       command_line("benchmarks.router_backward", argv), body)


if __name__ == "__main__":
    main()
