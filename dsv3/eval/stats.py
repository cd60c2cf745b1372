"""Intervals for rates (accuracy, toxicity): the Wilson score interval, which unlike
the normal approximation stays inside [0, 1] and is honest at small n and at rates
near 0 or 1, both common here (tiny task sets, a model at chance or at 100%)."""
from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson interval of successes / n. ``successes`` may be fractional (a tie
    among the best choices earns 1/ties of an item)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes!r}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_summary(successes: float, n: int) -> dict:
    """{"rate", "ci95", "n"}; the rate is NaN and the interval absent for n = 0."""
    if n == 0:
        return {"rate": float("nan"), "ci95": None, "n": 0}
    return {"rate": successes / n, "ci95": list(wilson_interval(successes, n)), "n": n}
