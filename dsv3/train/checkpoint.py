"""Saving and resuming a run, and exporting the trained model for evaluation.

``OUT_DIR/checkpoint/state.pt`` holds what every rank shares: model (expert biases
included), optimizer, grad scaler, step, the DPO reference model, the config and
the number of processes (ranks) that wrote it. What differs between the ranks of a
data-parallel run goes to one file per rank, ``rank{R}-step{S}.pt``: its loader
position (each rank draws its own stream), RNG states, int8-compression residuals
and running counters. Rank 0 cannot hold those for the others, and a rank resumed
from another's refuses the stream (or silently takes its residuals).

Every file is written to a temporary file, synced and renamed, so a crash mid-save
leaves the previous checkpoint intact. The rank files carry their step in their
name and are all written before rank 0 replaces ``state.pt``, which then names the
step whose rank files to read; a rank deletes its older files only after that. So
``state.pt`` and the rank files it points at always belong to the same step. The
ranks must share OUT_DIR (one filesystem); the trainer refuses a resume where they find
different checkpoints.

``OUT_DIR/final/`` is what ``dsv3 eval`` loads: config.json, model.pt and the
tokenizer, plus ``heldout.jsonl``, the documents the run held out (decoded back to
text), so the evaluation measures unseen text. Each of its files is written whole or
not at all (the same temporary file and rename), and a finished run started again
makes the export again when one of them is missing (``exported``): an export cut
short (a second Ctrl-C) is not taken for a whole one."""
import json
import os
import shutil
from pathlib import Path

import torch

from dsv3 import torch_files
from dsv3.whole_files import write_text_whole, write_whole
from dsv3.train.metrics import TB_FILES

# The trainer's state keys that are each rank's own (the rest is rank 0's to save).
RANK_KEYS = ("rng", "compression", "loader", "domain_tokens", "load_counts")


def checkpoint_path(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoint" / "state.pt"


def rank_path(out_dir: Path, rank: int, step: int) -> Path:
    return checkpoint_path(out_dir).parent / f"rank{rank}-step{step}.pt"


def _write(path: Path, obj) -> None:
    """``torch.save`` to ``path``, whole or not at all (write_whole)."""
    write_whole(path, lambda f: torch.save(obj, f))


def save_state(out_dir: Path, state: dict, rank: int = 0, barrier=None) -> Path:
    """Called by every rank with its trainer's ``state_dict()`` (``state["world"]``
    ranks in all); ``barrier`` (``dist.barrier`` under DDP) keeps the order that
    makes the checkpoint consistent (see the module docstring)."""
    barrier = barrier or (lambda: None)
    path = checkpoint_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    step = state["step"]
    own = rank_path(out_dir, rank, step)
    _write(own, {"step": step, "world": state["world"], **{k: state[k] for k in RANK_KEYS}})
    barrier()  # every rank's file is on disk before state.pt points at this step
    if rank == 0:
        loader = state["loader"]
        _write(path, {**{k: v for k, v in state.items() if k not in RANK_KEYS},
                      "loader_stage": loader["stage"] if loader is not None else None})
    barrier()  # ... and state.pt points at it before anyone drops the older files
    for old in path.parent.glob(f"rank{rank}-step*.pt"):
        if old != own:
            old.unlink(missing_ok=True)
    return path


# What each directory remove_run clears holds when dsv3 wrote it: only these go (a
# user's own files there, e.g. an eval/ of their scripts or notes beside the report
# with out_dir ".", stay). "." is out_dir itself, which is never removed.
RUN_FILES = {"checkpoint": ("state.pt", "state.pt.tmp", "rank*-step*.pt", "rank*-step*.pt.tmp"),
             "final": ("config.json", "model.pt", "tokenizer.json", "heldout.jsonl",
                       "config.json.tmp", "model.pt.tmp", "tokenizer.json.tmp",
                       "heldout.jsonl.tmp"),
             "eval": ("eval.json", "eval.md", "difficulty.json"),
             "tb": TB_FILES,
             ".": ("metrics.jsonl", "metrics.jsonl.tmp", "summary.json", "report.html",
                   "summary.json.tmp", "report.html.tmp")}


def remove_run(out_dir: Path) -> None:
    """Deletes every output of the old run, for a run that starts over (--no-resume):
    its checkpoint, exported model, evaluation (``OUT_DIR/eval``, where ``make demo``
    writes it), metrics, TensorBoard logs, summary and report. Left until the new run
    writes its own, an interrupted new run would resume the old one (and export the
    old model as its own), and the old report, summary and scores would stand beside
    the new run's metrics as if they were its (the cloze difficulty schedule would
    start at the old model's level). Only the files dsv3 writes there (RUN_FILES); a
    directory left empty goes too."""
    for name, patterns in RUN_FILES.items():
        directory = Path(out_dir) / name
        if not directory.is_dir():
            continue
        for pattern in patterns:
            for path in directory.glob(pattern):
                if path.is_file():
                    path.unlink(missing_ok=True)
        if name != "." and not any(directory.iterdir()):
            directory.rmdir()


def _world_mismatch(out_dir: Path, saved: int | None, world: int) -> str:
    saved_text = f"{saved} process(es)" if saved is not None else \
        "one process, before checkpoints kept each rank's state"
    return (f"the checkpoint in {out_dir} was written by {saved_text}, this run has {world}: "
            f"each rank resumes its own data stream, so resume it on {saved or 1} "
            f"(torchrun --nproc_per_node {saved or 1}), or pass --no-resume to start over "
            f"there, or --out NEW_DIR to keep it")


def load_state(out_dir: Path, rank: int = 0, world: int | None = None) -> dict | None:
    """The trainer state of rank ``rank``: the shared state.pt with the rank's own file
    merged in. ``world`` (the run's process count) must be the one that saved it."""
    path = checkpoint_path(out_dir)
    if not path.is_file():
        return None
    shared = torch_files.load(path, map_location="cpu", weights_only=False)
    saved_world = shared.get("world")
    if saved_world is None:  # written before rank files: state.pt is one process's whole state
        if world not in (None, 1):
            raise ValueError(_world_mismatch(out_dir, None, world))
        return shared
    if world is not None and saved_world != world:
        raise ValueError(_world_mismatch(out_dir, saved_world, world))
    own_path = rank_path(out_dir, rank, shared["step"])
    if not own_path.is_file():
        raise FileNotFoundError(f"{path} is at step {shared['step']}, but rank {rank}'s own "
                                f"state {own_path} is missing: every rank must see the same "
                                f"out_dir (a shared filesystem)")
    own = torch_files.load(own_path, map_location="cpu", weights_only=False)
    del shared["loader_stage"]
    return {**shared, **{k: own[k] for k in RANK_KEYS}}


def run_load_counts(out_dir: Path, state: dict) -> list:
    """The run's expert loads (per MoE layer) over every rank's tokens: ``state`` is
    rank 0's (load_state), whose counts are its own; the other ranks' are in their
    files of the same step."""
    counts = [layer_counts.to(torch.int64, copy=True) for layer_counts in state["load_counts"]]
    for rank in range(1, state.get("world") or 1):
        path = rank_path(out_dir, rank, state["step"])
        if not path.is_file():
            raise FileNotFoundError(f"rank {rank}'s state {path} is missing, so its tokens "
                                    f"cannot be counted")
        own = torch_files.load(path, map_location="cpu", weights_only=False)
        for total, layer_counts in zip(counts, own["load_counts"]):
            total += layer_counts.to(total.device, torch.int64)
    return counts


def saved_run(out_dir: Path) -> dict | None:
    """The checkpoint's config, the stage its loader stopped in and its process count,
    its tensors memory-mapped rather than read: enough to check a resume before
    building the model."""
    path = checkpoint_path(out_dir)
    if not path.is_file():
        return None
    state = torch_files.load(path, map_location="cpu", weights_only=False, mmap=True)
    # "data": the data's fingerprint (None: saved before checkpoints kept one)
    if "world" not in state:  # written before rank files (one process)
        loader = state["loader"]
        return {"config": state["config"], "world": None, "step": state["step"],
                "loader_stage": loader["stage"] if loader is not None else None,
                "data": state.get("data")}
    return {"config": state["config"], "world": state["world"], "step": state["step"],
            "loader_stage": state["loader_stage"], "data": state.get("data")}


# What each part of a data fingerprint (data.data_fingerprint) covers, for the refusal.
DATA_PARTS = {"tokenizer": "the tokenizer (tokenizer.json)",
              "tokens": "the token data (tokens/: documents or token ids)",
              "mixture": "mixture.json's weights, seed or max_chunk_tokens",
              "val_fraction": "val_fraction (which documents are held out)"}


def data_changes(saved: dict | None, now: dict | None) -> list[str]:
    """What differs between the data a checkpoint was trained on and the data given
    now (both fingerprints; none where either is missing: a checkpoint from before
    fingerprints, or data built in memory without one)."""
    if not saved or not now:
        return []
    changes = []
    for part, what in DATA_PARTS.items():
        if saved.get(part) != now.get(part):
            changes.append(f"{what}: {saved.get(part)} -> {now.get(part)}"
                           if part == "val_fraction" else what)
    return changes


def check_data(out_dir: Path, saved: dict | None, now: dict | None, data_dir=None) -> None:
    """Refuses to resume on other data: the weights learned the old token ids, and the
    saved stream position points into the old documents. Re-running `dsv3 data prepare`
    into the same directory (a new tokenizer, new counts) is the usual way to get here."""
    changes = data_changes(saved, now)
    if changes:
        where = f" in {data_dir}" if data_dir is not None else ""
        raise ValueError(f"the checkpoint in {out_dir} was trained on other data than the "
                         f"data{where} now (changed since: {'; '.join(changes)}), so it "
                         f"cannot be resumed on it: pass --no-resume to start over there, "
                         f"--out NEW_DIR to keep it, or --data the data it was trained on")


# Settings added to TrainConfig since checkpoints were first written, with the value
# the runs saved before them had: their absence is not a change.
ADDED_SETTINGS = {"val_fraction": 0.05}


def _saved_config(saved: dict, config: dict) -> dict:
    """The saved config, with the settings ``config`` has that it predates."""
    added = {k: v for k, v in ADDED_SETTINGS.items() if k in config}
    return {**added, **saved["config"]}


def _resolved(config: dict, old: dict) -> dict:
    """``config`` with an unset val_fraction (None: the share the data was prepared
    with) taken as the saved run's: the data fingerprint, checked on its own, is what
    tells a changed split (`dsv3 train` resolves it before comparing)."""
    if config.get("val_fraction", 0) is None:
        return {**config, "val_fraction": old.get("val_fraction")}
    return config


def resume_changes(saved: dict, config: dict) -> list[str]:
    """``"setting: saved -> now"`` for every setting that differs from the saved run's
    (a resume takes the new values from its step on: a learning rate may change mid-run;
    those that would break the data stream are refused by check_resume first)."""
    saved_config = _saved_config(saved, config)
    old, new = _flatten(saved_config), _flatten(_resolved(config, saved_config))
    # out_dir is where the checkpoint was found: the same run whatever its spelling. A
    # data_dir is the same one when both spellings name one directory from here.
    old.pop("out_dir", None), new.pop("out_dir", None)
    if os.path.realpath(str(old.get("data_dir"))) == os.path.realpath(str(new.get("data_dir"))):
        old.pop("data_dir", None), new.pop("data_dir", None)
    return [f"{name}: {old.get(name)!r} -> {new.get(name)!r}"
            for name in sorted(old.keys() | new.keys()) if old.get(name) != new.get(name)]


def resume_conflicts(saved: dict, config: dict) -> list[str]:
    """``"setting: saved -> now"`` for each setting a resumed run cannot take: the model
    (its weights are of the saved shape) and those that shape the data stream it
    continues (the step split and batch shape of the stage it stopped in): with one
    changed, the saved stream position means nothing to the new run."""
    old = _saved_config(saved, config)
    new = _resolved(config, old)
    if len(old["stages"]) != len(new["stages"]):
        return [f"stages: {len(old['stages'])} -> {len(new['stages'])} stages"]
    stopped_in = saved["loader_stage"] if saved["loader_stage"] is not None else 0
    # the model first: its weights cannot load into another shape
    names = ["model", "model_overrides", "steps", "micro_batch", "grad_accum", "val_fraction"]
    names += [f"stages.{i}.fraction" for i in range(len(new["stages"]))]
    names += [f"stages.{i}.seq_len" for i in range(stopped_in + 1)]
    return [f"{name}: {_lookup(old, name)!r} -> {_lookup(new, name)!r}" for name in names
            if _lookup(old, name) != _lookup(new, name)]


def _flatten(node, prefix: str = "") -> dict:
    """A nested config as {"optim.lr": 0.003, "stages.0.seq_len": 64, ...}."""
    if isinstance(node, (dict, list)):
        items = node.items() if isinstance(node, dict) else enumerate(node)
        return {name: value for key, child in items
                for name, value in _flatten(child, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def _lookup(config: dict, name: str):
    node = config
    for part in name.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def check_resume(out_dir: Path, config: dict, world: int = 1,
                 data: dict | None = None) -> None:
    """Refuses, before any training, a resume the saved run cannot continue: other
    data (``data``, the data's fingerprint: see check_data), other data-shaping
    settings (see resume_conflicts) or another number of processes."""
    saved = saved_run(out_dir)
    if saved is not None and (saved["world"] or 1) != world:
        raise ValueError(_world_mismatch(out_dir, saved["world"], world))
    if saved is not None:
        check_data(out_dir, saved["data"], data, config.get("data_dir"))
    conflicts = resume_conflicts(saved, config) if saved is not None else []
    if conflicts:
        raise ValueError(f"{out_dir} holds a checkpoint of a run with other settings "
                         f"({'; '.join(conflicts)}), so it cannot be resumed under this config: "
                         f"pass --no-resume to start over there, or --out NEW_DIR to keep it")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def final_files(tokenizer: bool) -> tuple[str, ...]:
    """The files of a run's export (final/): with a tokenizer, it and the held-out
    documents too."""
    return ("config.json", "model.pt") + (("tokenizer.json", "heldout.jsonl") if tokenizer else ())


def exported(out_dir: Path, tokenizer: bool) -> bool:
    """Whether final/ holds every file of the export (``tokenizer``: the run has one).
    Each is written whole or not at all, so one missing is an export cut short."""
    final = Path(out_dir) / "final"
    return all((final / name).is_file() for name in final_files(tokenizer))


def export_model(out_dir: Path, model, tokenizer_path: Path | None) -> Path:
    """The evaluation layout: config.json (ModelConfig), model.pt (state dict), tokenizer.json,
    each written whole or not at all."""
    final = Path(out_dir) / "final"
    final.mkdir(parents=True, exist_ok=True)
    config = json.dumps(model.config.to_dict(), indent=1)
    write_text_whole(final / "config.json", config)
    _write(final / "model.pt", model.state_dict())
    if tokenizer_path is not None:
        with open(tokenizer_path, "rb") as source:
            write_whole(final / "tokenizer.json", lambda f: shutil.copyfileobj(source, f))
    return final


def export_heldout(path: Path, val: dict, tokenizer_path: Path, eos_id: int) -> int:
    """Held-out token streams back to documents ({domain, text} per line), written
    whole or not at all (a part of the held-out set would be scored as all of it);
    returns how many. Byte-level BPE decodes to exactly the text that was encoded."""
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    count = 0

    def write(out) -> None:
        nonlocal count
        for domain, tokens in sorted(val.items()):
            ids = tokens.tolist()
            start = 0
            for end in [i for i, t in enumerate(ids) if t == eos_id] + [len(ids)]:
                if end > start:
                    out.write(json.dumps({"domain": domain,
                                          "text": tokenizer.decode(ids[start:end])}) + "\n")
                    count += 1
                start = end + 1

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, write, "w")
    return count
