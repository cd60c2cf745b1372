"""What the grouped-GEMM autotuners chose in a GPU benchmark run, as table rows: the
config each key settled on, whether each variant flag (persistent launch, TMA loads,
flattened loops) won where it was weighed, and every config's median. Read from the tuners after the
timed calls; gpu_bench adds these rows to its report."""
from dsv3.kernels import grouped_gemm


VARIANTS = {"PERSISTENT": ("persistent", "grid"), "USE_TMA": ("tma", "pointer"),
            "FLATTEN": ("flat", "nested")}
FORWARD_FLAGS = ("FLATTEN", "USE_TMA")
WGRAD_FLAGS = ("PERSISTENT", "USE_TMA", "FLATTEN")


def tuned_choice(tuner, tuned_before: int, flags: tuple[str, ...]) -> dict:
    """The config the autotuner ran (read after the timed calls), and for each variant
    flag whether it won: the best time with it over the best without it
    ("tma_over_pointer", "persistent_over_grid") when this shape tuned it. The key is
    the tuner's key values and the dtypes, so a shape may still reuse an earlier
    shape's pick ("reused")."""
    config = tuner.best_config
    choice = {"config": tuned_label(config, flags)}
    if len(tuner.configs) > 1 and len(tuner.cache) == tuned_before:
        choice["config"] += " (reused)"
        return choice
    timings = getattr(tuner, "configs_timings", None) or {}  # absent with a single config
    for flag in flags:
        on, off = VARIANTS[flag]
        best = {}
        for c, t in timings.items():  # a median, or [median, p20, p80] by triton version
            ms = t[0] if isinstance(t, (list, tuple)) else t
            variant = _has(c, flag)
            best[variant] = min(ms, best.get(variant, float("inf")))
        if len(best) == 2:
            choice[f"{on}_over_{off}"] = best[True] / best[False]
    return choice


def autotune_picks() -> list[dict]:
    """Every config the GEMM autotuners settled on in this run, one row per key, the
    layers' own GEMMs included (the gathered first GEMM and its wgrad have no row of
    their own): which variants are ever picked, and so which are worth keeping."""
    picks = []
    for gemm, tuner, flags in (("forward/dgrad", grouped_gemm._grouped_mm_tuned, FORWARD_FLAGS),
                               ("wgrad", grouped_gemm._wgrad_tuned, WGRAD_FLAGS)):
        names = [name for name in tuner.keys if name in tuner.arg_names]
        for key, config in tuner.cache.items():
            shape = " ".join(f"{name}={value}" for name, value in zip(names, key))
            picks.append({"bench": f"autotune pick, {gemm}", "shape": shape,
                          "config": tuned_label(config, flags)})
            # Every config's median, fastest first (the JSON only): which are ever close.
            timed = getattr(tuner, "timings", {}).get(key, {})
            medians = {tuned_label(c, flags): t[0] if isinstance(t, (list, tuple)) else t
                       for c, t in timed.items()}
            if medians:
                picks[-1]["timings_ms"] = dict(sorted(medians.items(), key=lambda item: item[1]))
    return picks


def tuned_label(config, flags: tuple[str, ...]) -> str:
    names = " ".join(VARIANTS[flag][0 if _has(config, flag) else 1] for flag in flags)
    return (f"{names} {config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}x"
            f"{config.kwargs['BLOCK_K']} w{config.num_warps} s{config.num_stages}")


def _has(config, flag: str) -> bool:
    """Whether ``config`` takes the variant: a config without the flag does not."""
    return bool(config.kwargs.get(flag, False))
