"""Saving and resuming a run, and exporting the trained model for evaluation.

``OUT_DIR/checkpoint/state.pt`` holds everything a resumed run needs to continue
the same loss curve: model (expert biases included), optimizer, grad scaler, step,
RNG states, the DPO reference model, the compression residuals and the running
counters. Written to a temporary file and renamed, so a crash mid-save leaves the
previous checkpoint intact. ``OUT_DIR/final/`` is what ``dsv3 eval`` loads:
config.json, model.pt and the tokenizer, plus ``heldout.jsonl``, the documents the
run held out (decoded back to text), so the evaluation measures unseen text."""
import json
import os
import shutil
from pathlib import Path

import torch


def checkpoint_path(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoint" / "state.pt"


def save_state(out_dir: Path, state: dict) -> Path:
    path = checkpoint_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_state(out_dir: Path) -> dict | None:
    path = checkpoint_path(out_dir)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def saved_run(out_dir: Path) -> dict | None:
    """The checkpoint's config and loader position, its tensors memory-mapped rather
    than read: enough to check a resume before building the model."""
    path = checkpoint_path(out_dir)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return {"config": state["config"], "loader": state["loader"]}


def resume_conflicts(saved: dict, config: dict) -> list[str]:
    """``"setting: saved -> now"`` for each setting that shapes the data stream a resumed
    run continues (the step split and batch shape of the stage it stopped in): with
    one changed, the saved stream position means nothing to the new run."""
    old, new = saved["config"], config
    if len(old["stages"]) != len(new["stages"]):
        return [f"stages: {len(old['stages'])} -> {len(new['stages'])} stages"]
    stopped_in = saved["loader"]["stage"] if saved["loader"] else 0
    names = ["steps", "micro_batch", "grad_accum"]
    names += [f"stages.{i}.fraction" for i in range(len(new["stages"]))]
    names += [f"stages.{i}.seq_len" for i in range(stopped_in + 1)]
    return [f"{name}: {_lookup(old, name)!r} -> {_lookup(new, name)!r}" for name in names
            if _lookup(old, name) != _lookup(new, name)]


def _lookup(config: dict, name: str):
    node = config
    for part in name.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def check_resume(out_dir: Path, config: dict) -> None:
    saved = saved_run(out_dir)
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


def export_model(out_dir: Path, model, tokenizer_path: Path | None) -> Path:
    """The evaluation layout: config.json (ModelConfig), model.pt (state dict), tokenizer.json."""
    final = Path(out_dir) / "final"
    final.mkdir(parents=True, exist_ok=True)
    (final / "config.json").write_text(json.dumps(model.config.to_dict(), indent=1))
    torch.save(model.state_dict(), final / "model.pt")
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, final / "tokenizer.json")
    return final


def export_heldout(path: Path, val: dict, tokenizer_path: Path, eos_id: int) -> int:
    """Held-out token streams back to documents ({domain, text} per line); returns
    how many. Byte-level BPE decodes to exactly the text that was encoded."""
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        for domain, tokens in sorted(val.items()):
            ids = tokens.tolist()
            start = 0
            for end in [i for i, t in enumerate(ids) if t == eos_id] + [len(ids)]:
                if end > start:
                    out.write(json.dumps({"domain": domain,
                                          "text": tokenizer.decode(ids[start:end])}) + "\n")
                    count += 1
                start = end + 1
    return count
