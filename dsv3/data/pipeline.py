"""Chains steps into one lazy generator, shows progress, writes per-step stats.

Steps are generators, so the chain holds one document at a time whatever the corpus
size; the progress bar sits on the output of the last step (documents that made it
through) and each step's own counters say where the others went.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Iterator, Sequence

from tqdm.auto import tqdm

from dsv3.data.document import Document
from dsv3.data.step import Step


class Pipeline:
    def __init__(self, steps: Sequence[Step], reviewer=None) -> None:
        names = [s.name for s in steps]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"steps: names must be unique (their stats and side files are "
                             f"keyed by name), repeated: {dupes}")
        for s in steps:
            if not isinstance(s, Step):
                raise TypeError(f"steps: expected Step instances, got {type(s).__name__}")
        self.steps = list(steps)
        for s in self.steps:  # a dsv3.data.review.ReviewSampler, or None
            s.reviewer = reviewer

    def run(self, docs: Iterable[Document], *, progress: bool = True,
            total: int | None = None) -> Iterator[Document]:
        stream: Iterable[Document] = docs
        for step in self.steps:
            stream = step(stream)
        if progress:
            stream = tqdm(stream, desc="documents kept", unit="doc", total=total)
        yield from stream

    def stats(self) -> dict:
        return {s.name: s.stats.to_dict() for s in self.steps}

    def write_stats(self, path: str | os.PathLike, extra: dict | None = None) -> dict:
        out = {"steps": self.stats(), **(extra or {})}
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2, ensure_ascii=False)
        return out

    def close(self) -> None:
        for s in self.steps:
            if s.dropped_writer is not None:
                s.dropped_writer.close()
