"""Learning-rate schedules: linear warm-up, then cosine decay or WSD
(warm-up, stable, decay: a constant plateau and a short linear decay at the end,
which lets a run be extended or branched from the plateau without a restart)."""
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
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / decay_steps)
    return 1.0 - (1 - min_ratio) * progress
