"""``dsv3 train``: run a training config (all its stages), resuming from the
checkpoint in its out_dir if there is one. Under ``torchrun`` (WORLD_SIZE > 1) it
joins the process group (gloo on CPU, NCCL on GPU) and trains data-parallel."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# What a shell reports for a process a signal ended is 128 + the signal's number (130
# for Ctrl-C, 143 for SIGTERM): a stopped run exits so, and scripts and schedulers see
# that it stopped short, though it saved its checkpoint.
STOPPED_BASE = 128


def _train(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from dsv3.devices import check_device
    from dsv3.train.checkpoint import check_resume, exported, resume_changes, saved_run
    from dsv3.validate import output_path
    from dsv3.train.config import load_config
    from dsv3.train.data import TrainData, check_stage_mixtures
    from dsv3.train.report import reported
    from dsv3.train.stop import TrainingStopped
    from dsv3.train.trainer import Trainer

    # Paths as given, not through --set's JSON parsing (--out 2024 is a directory, not 2024).
    paths = {"out_dir": args.out, "data_dir": args.data}
    config = load_config(args.config, args.set or [], {k: v for k, v in paths.items() if v})
    check_device(args.device)
    output_path("out_dir", config.out_dir, directory=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    # The data before anything is decided or written: the stages' mixtures name its
    # domains, and a resume must be on the data the checkpoint was trained on.
    data = TrainData.load(config.data_dir, config.val_fraction)
    # the share it was split with, saved and compared on a resume as such (a checkpoint
    # of a run with the setting unset holds the number, as one from before it could be)
    config.val_fraction = data.val_fraction
    check_stage_mixtures(config.stages, data.domains)
    if not args.no_resume:
        check_resume(config.out_dir, config.to_dict(), world, data.fingerprint)
        saved = saved_run(config.out_dir)
        if saved is not None and rank == 0:
            _say_resuming(config, saved, resume_changes(saved, config.to_dict()))
        out = Path(config.out_dir)
        # A finished run: nothing to train, nothing rewritten. Not decided here under
        # torchrun: a rank that returned would leave the others waiting for it in the
        # process group; there the trainer, once the ranks agree on the checkpoint,
        # trains nothing and rewrites nothing either.
        if (world == 1 and saved is not None and saved["step"] >= config.steps
                and exported(out, data.tokenizer_path is not None) and reported(out)):
            return 0
        # (Finished but a file of its export or report missing, e.g. killed between the
        # last save and the export, or in it: the trainer makes them and trains nothing.)
    distributed = world > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        trainer = Trainer(config, data, device=args.device)
        history = trainer.train(resume=not args.no_resume, progress=not args.no_progress)
    except TrainingStopped as stopped:  # Ctrl-C or SIGTERM: saved, not finished
        if rank == 0:
            _say_stopped(stopped, args.no_resume)
        return STOPPED_BASE + stopped.signum
    finally:
        if distributed:
            dist.destroy_process_group()
    if trainer.rank == 0:
        last = len(config.stages) - 1
        print(json.dumps({"out_dir": config.out_dir, "steps": trainer.step,
                          "first_logged_loss": _logged_loss(history[:1], config),
                          "last_stage_loss": _logged_loss(
                              [r for r in history if r["stage"] == last][-1:], config),
                          "report": os.path.join(config.out_dir, "report.html")}, indent=2))
    return 0


def _say_resuming(config, saved: dict, changes: list[str]) -> None:
    """What a resume does, on stderr: a run started again with other settings would
    otherwise continue (or, finished, do nothing) without a word."""
    import sys

    where = f"dsv3 train: {config.out_dir} holds this run's checkpoint at step {saved['step']}"
    if saved["step"] >= config.steps:
        print(f"{where}, all of its {config.steps} steps: nothing to train (pass --no-resume "
              f"to start over there, or --out NEW_DIR to keep it)", file=sys.stderr)
    else:
        print(f"{where}: resuming there, to step {config.steps} (--no-resume starts over)",
              file=sys.stderr)
    if saved.get("data") is None and saved["step"] < config.steps:
        print("dsv3 train: the checkpoint was saved before checkpoints recorded their data: "
              "make sure --data is the data it was trained on (same tokenizer and tokens)",
              file=sys.stderr)
    if changes:
        verb = "not applied" if saved["step"] >= config.steps else "from here on"
        print(f"dsv3 train: settings changed since it was saved ({verb}): "
              + "; ".join(changes), file=sys.stderr)


def _say_stopped(stopped, no_resume: bool) -> None:
    """One line on stderr: where the checkpoint is and how to go on from it."""
    import sys

    again = ("run the same command without --no-resume" if no_resume
             else "run the same command again")
    print(f"dsv3 train: stopped by {stopped.signal_name} at step {stopped.step} of "
          f"{stopped.steps}; checkpoint saved in {os.path.join(stopped.out_dir, 'checkpoint')}; "
          f"{again} to resume from step {stopped.step} (--no-resume starts over)",
          file=sys.stderr)


def _logged_loss(records: list[dict], config) -> dict | None:
    """The loss of ``records``' one record (none: None) under its metrics name: ``loss``,
    or ``dpo/loss`` for a DPO stage (another quantity, on another scale), with its
    stage and step."""
    if not records:
        return None
    (record,) = records
    stage = config.stages[record["stage"]]
    name = "dpo/loss" if stage.kind == "dpo" else "loss"
    return {"stage": stage.name, "step": record["step"], name: record.get(name)}


def register(groups: argparse._SubParsersAction) -> None:
    parser = groups.add_parser(
        "train", help="train a model through the stages of a config",
        description="Train a model through the stages of a config, resuming from the "
                    "checkpoint in out_dir if there is one.",
        epilog="Ctrl-C (or SIGTERM) stops after the current step: the run saves its "
               "checkpoint, exits with status 130 (143 on SIGTERM: 128 + the signal's "
               "number) and resumes with the same command; a second Ctrl-C stops at once, "
               "without saving. In the last step the run finishes instead (checkpoint and "
               "export). Under torchrun the workers are SIGKILLed 30 s after it passes the "
               "signal on: if a step plus a save take longer, raise that with torchrun "
               "--shutdown-timeout S (or TORCH_ELASTIC_SHUTDOWN_TIMEOUT=S), else the stop's "
               "checkpoint is lost and the run resumes from the one before. save_every = N "
               "(--set save_every=N) also saves every N steps, for a run killed without "
               "warning (0: only at the end and on a stop). A resume must be on the same "
               "data (tokenizer, tokens, mixture.json, val_fraction) and model; --no-resume "
               "starts over.")
    parser.add_argument("--config", help="TOML or YAML training config, or a shipped config's name: demo "
                             "(default: built-in defaults)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config value, e.g. optim.lr=1e-3, stages.0.seq_len=64 "
                             "or model_overrides.moe.top_k=4 (the model preset's fields; a "
                             "moe field changes that field alone) (repeatable; values parse "
                             "as JSON when they can)")
    parser.add_argument("--data", help="prepared data directory (overrides data_dir; default "
                                       "out/data, where `dsv3 data prepare` writes)")
    parser.add_argument("--out", help="output directory (overrides out_dir; default out/run)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--no-resume", action="store_true",
                        help="start over even if out_dir holds a checkpoint: the old run's "
                             "checkpoint, final/, eval/, metrics, TensorBoard logs and report "
                             "are deleted first")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_train)
