"""Dynamic difficulty: tasks are tagged with levels; the model is evaluated at its
current level, and once its accuracy there reaches the threshold (default 85%) the
next evaluation moves to the next level. Every evaluation appends
(evaluation index, level, accuracy, promoted?) to the history, and the whole schedule
is saved as JSON between runs, so a trainer evaluating every N steps sees its model
climb. A model at the top level stays there. The point accuracy is compared (not
its interval): with small task sets pick a higher threshold rather than a noisy rule.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from dsv3.eval.jsonl import read_text
from dsv3.whole_files import write_text_whole


@dataclass
class DifficultySchedule:
    levels: list[int]
    threshold: float = 0.85
    current: int | None = None  # None: the lowest level
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.levels, list) or not self.levels or not all(
                isinstance(level, int) and not isinstance(level, bool) for level in self.levels):
            raise ValueError(f"levels must be a non-empty list of ints, got {self.levels!r}")
        self.levels = sorted(set(self.levels))
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold!r}")
        if self.current is None:
            self.current = self.levels[0]
        if self.current not in self.levels:
            raise ValueError(f"current level {self.current!r} is not one of {self.levels}")
        # A saved state's history is appended to and rendered (eval.md, the report) only
        # after the model ran: a bad entry must fail here, before it, by its index.
        if not isinstance(self.history, list):
            raise ValueError(f"history must be a list of entries, got "
                             f"{type(self.history).__name__}")
        for index, entry in enumerate(self.history):
            _check_entry(entry, f"history entry {index}")

    def record(self, accuracy: float) -> bool:
        """Log an evaluation at the current level; promote when it passed. Returns
        whether the next evaluation runs at a higher level."""
        if not 0 <= accuracy <= 1:
            raise ValueError(f"accuracy must be in [0, 1], got {accuracy!r}")
        index = self.levels.index(self.current)
        promoted = accuracy >= self.threshold and index + 1 < len(self.levels)
        self.history.append({"evaluation": len(self.history), "level": self.current,
                             "accuracy": accuracy, "promoted": promoted})
        if promoted:
            self.current = self.levels[index + 1]
        return promoted

    def to_dict(self) -> dict:
        return asdict(self)


HISTORY_FIELDS = ("evaluation", "level", "accuracy", "promoted")  # what ``record`` appends


def _check_entry(entry, where: str) -> None:
    """One history entry as ``record`` writes it (the reports format each field)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object with {', '.join(HISTORY_FIELDS)}; "
                         f"got {entry!r}")
    for name in HISTORY_FIELDS:
        if name not in entry:
            raise ValueError(f"{where} lacks {name!r}")
    for name in ("evaluation", "level"):
        if not isinstance(entry[name], int) or isinstance(entry[name], bool):
            raise ValueError(f"{where}: {name} must be a whole number, got {entry[name]!r}")
    accuracy = entry["accuracy"]
    if (not isinstance(accuracy, (int, float)) or isinstance(accuracy, bool)
            or not 0 <= accuracy <= 1):
        raise ValueError(f"{where}: accuracy must be a number in [0, 1], got {accuracy!r}")
    if not isinstance(entry["promoted"], bool):
        raise ValueError(f"{where}: promoted must be true or false, got {entry['promoted']!r}")


def load_schedules(path: str) -> dict[str, DifficultySchedule]:
    """{task: schedule} from a JSON state file; {} when the file does not exist yet."""
    if not os.path.exists(path):
        return {}
    try:
        raw = json.loads(read_text(path, "difficulty state"))
    except json.JSONDecodeError as e:
        raise ValueError(f"difficulty state: {path} is not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"difficulty state: {path} must hold a JSON object of task -> schedule")
    schedules = {}
    for task, state in raw.items():
        try:
            schedules[task] = DifficultySchedule(**state)
        except (TypeError, ValueError) as e:
            raise ValueError(f"difficulty state: {path}: {task!r}: {e}") from None
    return schedules


def save_schedules(path: str, schedules: dict[str, DifficultySchedule]) -> None:
    text = json.dumps({task: s.to_dict() for task, s in schedules.items()}, indent=2)
    write_text_whole(path, text)  # a crash mid-write must not lose the history


def schedule_for(schedules: dict[str, DifficultySchedule], task: str, levels: list[int],
                 threshold: float) -> DifficultySchedule:
    """The task's saved schedule, or a new one at the lowest level. Levels and threshold
    follow the current task definition, the position and history are kept. So a saved
    levels list that lacks levels of the task (cloze states saved while its schedule was
    rebuilt from the current level alone held ``[1]``) gets the full list back and can
    promote again."""
    saved = schedules.get(task)
    current = saved.current if saved is not None and saved.current in levels else None
    schedules[task] = DifficultySchedule(sorted(set(levels)), threshold, current,
                                         saved.history if saved is not None else [])
    return schedules[task]
