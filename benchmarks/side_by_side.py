"""The command line the A/B layer benchmarks share (output_cache.py, router_backward.py):
their options, the machine's load while they ran, and the table appended to
RESULTS.md. Each supplies its own measure() and table()."""
import argparse
import sys
import time


def dsv3_step_times(shape: str, dtype: str, steps: int):
    """(the dsv3 layer step at ``shape`` and ``dtype``, the ms of ``steps`` calls of it
    after 3 warm-up calls): what a child process of these benchmarks measures."""
    from benchmarks.providers import DTYPES, Shape, make_step
    step = make_step("dsv3", Shape.parse(shape), DTYPES[dtype])
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return step, times


def shape_name(name: str) -> str:
    from benchmarks.providers import Shape
    try:
        return Shape.parse(name).name
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse(description: str, argv, default_dtypes: list[str]) -> argparse.Namespace:
    from benchmarks.providers import DTYPES, SHAPES
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--shapes", nargs="+", default=[shape.name for shape in SHAPES],
                        type=shape_name,
                        help="layer shapes, T<tokens>-D<dim>-F<ffn>-E<experts>-K<top-k>")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=default_dtypes)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per process")
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
