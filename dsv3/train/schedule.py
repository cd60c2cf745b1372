"""Learning-rate schedules: linear warm-up, then cosine decay or WSD
(warm-up, stable, decay: a constant plateau and a short linear decay at the end,
which lets a run be extended or branched from the plateau without a restart).

Both decays end on ``min_ratio`` at the last step: cosine decays over every step
after the warm-up, WSD over its last ``decay_fraction`` of the steps (never into
the warm-up). The trainer applies one schedule to the language-
modelling stages together, counted in their own steps (a DPO stage between them
pauses it), and restarts it over each DPO stage's steps."""
import math

SCHEDULES = ("cosine", "wsd", "constant")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine",
              min_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        # from the peak at the first step after the warm-up to the floor at the last
        span = total_steps - warmup_steps - 1
        progress = min(1.0, (step - warmup_steps) / span) if span > 0 else 1.0
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = _wsd_decay_steps(total_steps, warmup_steps, decay_fraction)
    decay_start = total_steps - decay_steps
    if decay_steps <= 0 or step < decay_start:
        return 1.0
    # + 1: each decay step lowers the rate (the plateau before it is the peak), the last
    # one to the floor
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 - (1 - min_ratio) * progress


def _wsd_decay_steps(total_steps: int, warmup_steps: int, decay_fraction: float) -> int:
    """WSD's decay length: ``decay_fraction`` of the steps, at least one unless the
    fraction is 0 (no decay), and none of them inside the warm-up."""
    steps = max(1, round(decay_fraction * total_steps)) if decay_fraction > 0 else 0
    return min(steps, total_steps - warmup_steps)
