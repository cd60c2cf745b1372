"""The command line the A/B layer benchmarks share (output_cache.py, router_backward.py):
their options, the machine's load while they ran, and the table appended to
RESULTS.md. Each supplies its own measure() and table()."""
import argparse
import json
import os
import subprocess
import sys
import time


def dsv3_step_times(shape: str, dtype: str, steps: int, n_shared_experts: int = 0):
    """(the dsv3 layer step at ``shape`` and ``dtype``, the ms of ``steps`` calls of it
    after 3 warm-up calls): what a child process of these benchmarks measures."""
    from benchmarks.providers import DTYPES, Shape, make_step
    step = make_step("dsv3", Shape.parse(shape), DTYPES[dtype],
                     n_shared_experts=n_shared_experts)
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return step, times


def module_output(variable: str, value: str | None, module: str, *args: str) -> str:
    """The stdout of ``python -m module args`` with the environment ``variable`` set to
    ``value`` (None: unset), in a fresh process."""
    env = {key: text for key, text in os.environ.items() if key != variable}
    if value is not None:
        env[variable] = value
    command = [sys.executable, "-m", module, *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed:\n{result.stderr[-2000:]}")
    return result.stdout


def step_times(variable: str, value: str | None, shape: str, dtype: str,
               steps: int, n_shared_experts: int = 0) -> list[float]:
    """dsv3_step_times' ms in a fresh process with ``variable`` set to ``value``."""
    out = module_output(variable, value, "benchmarks.side_by_side", "--child", shape, dtype,
                        str(steps), str(n_shared_experts))
    return json.loads(out.splitlines()[-1])


def peak_mib(variable: str, value: str | None, shape: str, dtype: str) -> float:
    """The dsv3 layer step's peak extra memory (benchmarks/memory.py's method) with
    ``variable`` set to ``value``."""
    out = module_output(variable, value, "benchmarks.memory", "--shape", shape, "--dtype",
                        dtype, "--provider", "dsv3")
    return float(out.split()[-2])  # "... dsv3: 183.9 MiB"


def two_setting_table(rows: list[dict], names: tuple[str, str], memory: str,
                      memory_label: str) -> str:
    """The A/B table: per row, each setting's median ms and the ratio (second over
    first), and each one's ``memory`` MiB (None: "-")."""
    first, second = names
    lines = [f"| shape | dtype | median ms, {first} / {second} | {second}/{first} | "
             f"{memory_label}, {first} / {second} |", "|---|---|--:|--:|--:|"]
    for row in rows:
        a, b = row[first], row[second]
        mib = "-" if a[memory] is None else f"{a[memory]:.1f} / {b[memory]:.1f}"
        lines.append(f"| {row['shape']} | {row['dtype']} | {a['median_ms']:.1f} / "
                     f"{b['median_ms']:.1f} | {b['median_ms'] / a['median_ms']:.2f} | {mib} |")
    return "\n".join(lines)


def shape_name(name: str) -> str:
    from benchmarks.providers import Shape
    try:
        return Shape.parse(name).name
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse(description: str, argv, default_dtypes: list[str],
          default_shapes: list[str] | None = None, default_steps: int = 30,
          shared_experts: bool = False) -> argparse.Namespace:
    """The options; the shapes default to the layer benchmark's. ``shared_experts``:
    a --shared-experts option too (the dsv3 layer's, 0 by default)."""
    from benchmarks.providers import DTYPES, SHAPES
    parser = argparse.ArgumentParser(description=description)
    if shared_experts:
        parser.add_argument("--shared-experts", type=int, default=0,
                            help="shared experts of the layer (each as wide as a routed one)")
    parser.add_argument("--shapes", nargs="+",
                        default=default_shapes or [shape.name for shape in SHAPES],
                        type=shape_name,
                        help="layer shapes, T<tokens>-D<dim>-F<ffn>-E<experts>-K<top-k>")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=default_dtypes)
    parser.add_argument("--steps", type=int, default=default_steps,
                        help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per setting")
    parser.add_argument("--write-results", action="store_true",
                        help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1")
    return args


def run(args: argparse.Namespace, measure, table, notes: str, title: str, module: str,
        argv) -> None:
    """measure(shape, dtype, steps, rounds) for every case, the table with ``notes``
    and the machine's foreign load, printed and (--write-results) appended."""
    from benchmarks.contention import foreign_cores, snapshot
    before = snapshot()
    rows = [measure(shape, dtype, args.steps, args.rounds)
            for shape in args.shapes for dtype in args.dtypes]
    foreign = foreign_cores(before, snapshot())
    body = (table(rows) + f"\n\n- {args.rounds} processes per setting, alternating, "
            f"{args.steps} timed steps each after 3 warm-up steps{notes}.\n- Other processes "
            f"used {foreign:.2f} cores on average while this ran.\n")
    print(body)
    if args.write_results:
        from benchmarks.results import append_section, command_line
        append_section(title, command_line(module, argv if argv is not None else sys.argv[1:]),
                       body)


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    # step_times' child: the step's times (ms) as JSON
    print(json.dumps(dsv3_step_times(sys.argv[2], sys.argv[3], int(sys.argv[4]),
                                     int(sys.argv[5]))[1]))
