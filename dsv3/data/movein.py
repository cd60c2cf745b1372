"""Moving a staged ``dsv3 data prepare`` run into its output directory so that an
interruption at any point (Ctrl-C, a kill, a power cut) can be finished later.

The move is one rename per file, and no file system renames a set of files at once:
stopped half way, the directory held a tokenizer of one run next to the tokens of
another, and a trainer read token ids of the wrong vocabulary without a word. So the
move rolls forward. Before its first rename a journal, ``JOURNAL`` in the output
directory, is written atomically (a temporary file, fsync, rename) naming the stage,
the files to move, the stale outputs to remove and the sources never to touch; from
then on the move is decided, and whoever finds the journal (the next ``dsv3 data
prepare`` into the directory, :func:`finish_interrupted`) finishes it: the files still
in the stage are moved (the others already were: each rename is atomic), the stale
outputs removed, stats.json moved last. Every step may be done twice, so a finish
that is itself interrupted is finished by the next one.

The journal goes only once the renames are on disk (the directories they changed
are fsynced), and the stage after it: while the journal exists the stage holds the
files not yet moved, so nothing may delete it. The staged files are fsynced before
the journal is written, so that after a power cut the journal never names files
whose contents were still in memory. The cost: those fsyncs, and a prepared
directory that readers must check (:func:`check_complete`) before they trust it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil

JOURNAL = ".prepare-journal.json"  # hidden, like the stage: no source glob matches it
_STAGE_RE = re.compile(r"^\.partial-[^/\\]+$")


def journal_path(out: str) -> str:
    return os.path.join(out, JOURNAL)


def check_complete(directory: str, option: str) -> None:
    """Refuse a prepared ``directory`` that an interrupted ``dsv3 data prepare`` left
    mid-update: it may hold the tokenizer of one run and the tokens of another.
    ``option`` names the setting that pointed at it."""
    if os.path.lexists(journal_path(directory)):
        raise ValueError(f"{option}: {os.fspath(directory)!r} is mid-update: a `dsv3 data "
                         f"prepare` into it was interrupted while moving its outputs in "
                         f"({JOURNAL} is there), so it may hold files of two runs; re-run "
                         f"that `dsv3 data prepare` (same config) to finish the update")


def _relative(path: object) -> bool:
    """A path inside the output directory: a damaged journal must not name others."""
    return (isinstance(path, str) and path != "" and not os.path.isabs(path)
            and ".." not in path.replace("\\", "/").split("/"))


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dirs(out: str, relatives) -> None:
    """Every directory holding one of ``relatives`` (and those between it and ``out``),
    then ``out``: a rename or removal is durable once its directory is."""
    dirs = set()
    for relative in relatives:
        parent = os.path.dirname(relative)
        while parent:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    for directory in sorted(dirs, key=len, reverse=True):  # innermost first
        if os.path.isdir(os.path.join(out, directory)):
            _fsync(os.path.join(out, directory))
    _fsync(out)


def _write_journal(out: str, journal: dict) -> None:
    path = journal_path(out)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(journal, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C too: no half-written journal stays behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync(out)


def _refuse_replacing(out: str, relatives, sources: dict[str, int], why: str,
                      left: str = "nothing was written") -> None:
    for relative in relatives:
        path = os.path.join(out, relative)
        source = sources.get(os.path.realpath(path))
        if source is not None:
            raise ValueError(f"sources[{source}]: {path!r} is a source of this run and also "
                             f"{why}; move it out of {out!r} or write the run elsewhere "
                             f"({left})")


def _remove_stale(out: str, stale, protected: set[str]) -> None:
    """The listed outputs of the previous run that this one did not write: only files,
    never a source (of the interrupted run or of the one finishing it)."""
    for relative in stale:
        path = os.path.join(out, relative)
        if os.path.isfile(path) and os.path.realpath(path) not in protected:
            os.remove(path)


def _finish(out: str, journal: dict, protected: set[str]) -> None:
    """The journal's move from wherever it stopped; each step may run twice."""
    stage = os.path.join(out, journal["stage"])

    def move(relative: str) -> None:
        staged = os.path.join(stage, relative)
        if os.path.lexists(staged):  # not moved yet
            target = os.path.join(out, relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(staged, target)

    for relative in sorted(journal["files"]):
        if relative != "stats.json":
            move(relative)
    _remove_stale(out, journal["stale"], protected | set(journal["sources"]))
    # last: a reader of stats.json sees the old run's (whose list covers the files to
    # remove) until every other file is in
    move("stats.json")
    _fsync_dirs(out, [*journal["files"], *journal["stale"]])
    os.remove(journal_path(out))  # the move is done and on disk: the stage may go now
    _fsync(out)
    shutil.rmtree(stage, ignore_errors=True)


def move_in(stage: str, out: str, stale, sources: dict[str, int]) -> None:
    """Every file under ``stage`` (a directory inside ``out``, holding a stats.json) to
    the same place in ``out``, stats.json last; before it, the ``stale`` outputs
    (relative to ``out``) are removed. ``sources`` (real path -> source index) are never
    replaced or removed: a staged file that would replace one stops the move before
    anything changes."""
    staged = sorted(os.path.relpath(os.path.join(d, f), stage)
                    for d, _, files in os.walk(stage) for f in files)
    _refuse_replacing(out, staged, sources, "one of its outputs")
    for d, _, files in os.walk(stage):  # the contents on disk before a journal names them
        for f in files:
            _fsync(os.path.join(d, f))
        _fsync(d)
    journal = {"stage": os.path.basename(stage),
               # a rename keeps size and modification time: how a file found in ``out``
               # is told from the one it replaced
               "files": {f: _identity(os.path.join(stage, f)) for f in staged},
               "stale": sorted(stale), "sources": sorted(sources)}
    _write_journal(out, journal)
    _finish(out, journal, set())


def _identity(path: str) -> list[int]:
    st = os.lstat(path)
    return [st.st_size, st.st_mtime_ns]


def _read_journal(out: str) -> dict | None:
    path = journal_path(out)
    try:
        with open(path, encoding="utf-8") as f:
            journal = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(_cannot_finish(out, f"its journal {path!r} cannot be read ({e})"))
    if not (isinstance(journal, dict) and isinstance(journal.get("stage"), str)
            and _STAGE_RE.match(journal["stage"])
            and isinstance(journal.get("files"), dict) and "stats.json" in journal["files"]
            and all(map(_relative, journal["files"]))
            and isinstance(journal.get("stale"), list) and all(map(_relative, journal["stale"]))
            and isinstance(journal.get("sources"), list)):
        raise ValueError(_cannot_finish(out, f"its journal {path!r} is damaged"))
    return journal


def _cannot_finish(out: str, why: str, stage: str | None = None) -> str:
    remove = repr(journal_path(out)) + (f" and {stage!r}" if stage else "")
    return (f"{out!r} is mid-update from an interrupted `dsv3 data prepare`, and the move "
            f"cannot be finished: {why}. It holds files of two runs: remove {remove} and run "
            f"`dsv3 data prepare` again to rewrite its outputs, or write the run to a fresh "
            f"directory")


def finish_interrupted(out: str, sources: dict[str, int]) -> str | None:
    """Finish the move of an interrupted run into ``out``, if there is one; returns its
    stage's path (None if ``out`` had none to finish). ``sources`` are those of the run
    about to start: they are not replaced or removed either."""
    journal = _read_journal(out)
    if journal is None:
        return None
    stage = os.path.join(out, journal["stage"])
    if not os.path.isdir(stage):
        raise ValueError(_cannot_finish(out, f"its staging directory {stage!r}, which held "
                                             f"the files not yet moved, is gone"))
    remaining = [f for f in journal["files"] if os.path.lexists(os.path.join(stage, f))]
    lost = []
    for relative, identity in journal["files"].items():
        if relative not in remaining:
            target = os.path.join(out, relative)
            if not os.path.lexists(target) or _identity(target) != identity:
                lost.append(relative)
    if lost:
        raise ValueError(_cannot_finish(out, f"{sorted(lost)} are neither in {stage!r} nor "
                                             f"moved into {out!r}", stage))
    _refuse_replacing(out, remaining, sources, "a file the interrupted run would move in",
                      left="nothing more was moved: the directory is still mid-update")
    _finish(out, journal, set(sources))
    return stage
