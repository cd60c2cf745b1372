"""pytest-benchmark timings of the MoE layer's forward+backward, every provider
side by side for each shape and dtype, so the ratios come from one run.

Run it through ``python -m benchmarks.run`` (``make bench``), which picks the
cases with DSV3_BENCH_SHAPES / DSV3_BENCH_DTYPES (comma-separated shape names like
T4096-D512-F1024-E8-K2 and dtype names fp32, bf16; default: all) and turns the
JSON into the ratio table. It is outside ``tests/``, so ``make test`` skips it.
"""
import math
import os
import time

import pytest

from benchmarks.bench_checks import disagreement
from benchmarks.providers import (DTYPES, PROVIDERS, SHAPES, Shape, Unavailable, make_step,
                                  outputs_and_gradients, reference_outputs)

# Seconds of timed rounds per case: one call ranges from ~30 ms to a few seconds,
# so a fixed round count would either starve the fast cases of samples or spend
# minutes on the slow reference loop. The clamp keeps >= 5 samples for a median
# and the whole suite within a few minutes on 2 cores.
TARGET_SECONDS = 3.0
MIN_ROUNDS, MAX_ROUNDS = 5, 30
# Warm-up by time, not by a call count: dsv3's huge-page output buffers take ~4
# calls (~1.7 s at E=64, K=2) to reach steady speed, the slowest providers one.
WARMUP_SECONDS = 2.0


def _warm_up(step) -> float:
    """Call ``step`` at least twice and for at least WARMUP_SECONDS (the first call
    pays one-time costs: thread pools, page faults, op set-up); return the last
    call's seconds, which sizes the round count."""
    calls, started = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - started < WARMUP_SECONDS:
        call_started = time.perf_counter()
        step()
        calls += 1
    return time.perf_counter() - call_started


def _selected(variable: str, default: list[str]) -> list[str]:
    value = os.environ.get(variable, "")
    return [name for name in value.split(",") if name] or default


SELECTED_SHAPES = [Shape.parse(name) for name in
                   _selected("DSV3_BENCH_SHAPES", [shape.name for shape in SHAPES])]
SELECTED_DTYPES = _selected("DSV3_BENCH_DTYPES", list(DTYPES))
# Providers vary fastest, so the four timings behind one ratio are taken back to
# back, under the same machine load.
CASES = [pytest.param(shape, dtype_name, provider, id=f"{shape.name}-{dtype_name}-{provider}")
         for shape in SELECTED_SHAPES for dtype_name in SELECTED_DTYPES for provider in PROVIDERS]


@pytest.mark.parametrize("shape, dtype_name, provider", CASES)
def test_layer(benchmark, shape, dtype_name, provider):
    try:
        step = make_step(provider, shape, DTYPES[dtype_name])
    except Unavailable as reason:
        pytest.skip(str(reason))
    if provider in ("dsv3", "grouped_mm"):  # the same layer as the reference loop
        # A timing of a wrong result is no figure: fail the case, not print it.
        wrong = disagreement(outputs_and_gradients(step),
                             reference_outputs(shape, DTYPES[dtype_name]))
        if wrong is not None:
            pytest.fail(f"{provider} disagrees with the reference loop ({wrong}): not timed")
    call_s = _warm_up(step)
    rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(TARGET_SECONDS / call_s)))

    benchmark.group = f"{shape.name}-{dtype_name}"
    benchmark.extra_info.update(shape=shape.name, dtype=dtype_name, provider=provider,
                                flops=shape.flops)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1)
