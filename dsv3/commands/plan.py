"""``dsv3 plan``: memory and communication of a training config, and how many GPUs
of a given memory it needs (see dsv3.train.planner)."""
from __future__ import annotations

import argparse
import json
import os
import re

from dsv3.validate import number, option, whole_number


# Option checks run at parse time (argparse ``type=`` through dsv3.validate.option), so a
# bad value stops with the usage line and "argument --OPTION: ..." before any config is loaded.
@option
def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = text  # not a whole number: refused as the user wrote it
    whole_number("value", value, 1)
    return value


def _gigabytes(text: str) -> float:
    """``80GB``/``80G``/``80`` (10^9 bytes) or ``80GiB`` (2^30 bytes), as GB."""
    # one number, so that ".." or "1.2.3" is refused here rather than by float()
    match = re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*(GB|G|GiB)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"expected a size like 80GB or 80GiB, got {text!r}")
    value = float(match.group(1))
    # 0 would plan for "more than 4096 x 0GB"; a long digit string overflows to inf
    number(f"size {text!r}", value, 0, low_open=True)
    return value * 1.073741824 if (match.group(2) or "").lower() == "gib" else value


@option
def _gpu_mem(text: str) -> str:
    """Checks the size but keeps the user's spelling: the output repeats it."""
    _gigabytes(text)
    return text


def _plans_a_run(args: argparse.Namespace) -> bool:
    """Whether the command plans a training run on data (a --config, or a data_dir
    set): then its prepared tokenizer sets the vocabulary. A bare preset
    (``--set model=deepseek-v3``) keeps the preset's, whatever ./out/data holds."""
    return args.config is not None or any(
        item.split("=", 1)[0].strip() == "data_dir" for item in args.set or [])


def _prepared_vocab_size(data_dir: str) -> int | None:
    """The vocabulary of the tokenizer `dsv3 data prepare` wrote to ``data_dir``, which
    the trainer's model takes whatever the preset says; None where there is none."""
    try:
        with open(os.path.join(data_dir, "tokens", "manifest.json"), encoding="utf-8") as f:
            return int(json.load(f)["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):  # not prepared (or not readable)
        return None


def _plan(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from dsv3.train.config import load_config
    from dsv3.train.planner import gpus_needed, plan

    config = load_config(args.config, args.set or [])
    model = config.model_config()
    vocab_from = "the preset's"
    if args.vocab_size is not None:  # not truthiness: 0 is refused by the parser, not ignored
        model, vocab_from = replace(model, vocab_size=args.vocab_size), "--vocab-size"
    elif "vocab_size" in config.model_overrides:
        vocab_from = "model_overrides.vocab_size"
        prepared = _prepared_vocab_size(config.data_dir) if _plans_a_run(args) else None
        if prepared is not None and prepared != model.vocab_size:  # planned as asked, but
            vocab_from += (f"; dsv3 train would refuse it: the tokenizer in "
                           f"{config.data_dir} has {prepared}")
    elif _plans_a_run(args) and (prepared := _prepared_vocab_size(config.data_dir)) is not None:
        # what `dsv3 train` builds: its model takes the tokenizer's vocabulary
        model = replace(model, vocab_size=prepared)
        vocab_from = f"the tokenizer in {config.data_dir}"
    # the first stage is never DPO; a DPO stage doubles its rows and holds a reference model
    seq_len = max(stage.seq_len for stage in config.stages if stage.kind != "dpo")
    dpo_seq_len = max((stage.seq_len for stage in config.stages if stage.kind == "dpo"),
                      default=None)
    settings = dict(micro_batch=config.micro_batch, seq_len=seq_len, dpo_seq_len=dpo_seq_len,
                    grad_accum=config.grad_accum, precision=config.precision,
                    checkpointing=config.checkpointing, strategy=args.strategy,
                    compress_grads=config.compress_grads, zero=args.zero)
    gpu_mem = _gigabytes(args.gpu_mem)
    result = plan(model, gpus=args.gpus, gpu_mem_gb=gpu_mem, **settings)
    print(f"{'vocabulary':32s} {model.vocab_size} ({vocab_from})")
    print(result.table())
    verdict = "fits" if result.fits else "does not fit"
    print(f"{'on ' + str(args.gpus) + ' x ' + args.gpu_mem:32s} {verdict} "
          f"(90% of memory usable, checkpointing={config.checkpointing})")
    needed = gpus_needed(model, gpu_mem, **settings)
    if needed:
        layout = plan(model, gpus=needed, gpu_mem_gb=gpu_mem, **settings).layout()
        print(f"{'GPUs needed':32s} {needed} x {args.gpu_mem} "
              f"({args.strategy}: {layout}, ZeRO-{args.zero})")
    else:  # under "ep" the experts shard at most n_experts ways: more GPUs may never fit
        widest = plan(model, gpus=4096, gpu_mem_gb=gpu_mem, **settings)
        # under "ddp" nothing is split: "experts split at most 1 ways" said otherwise
        split = (f"experts split at most {widest.expert_parallel} ways, "
                 if args.strategy == "ep" else "")
        print(f"{'GPUs needed':32s} more than 4096 x {args.gpu_mem} ({args.strategy}: "
              f"{split}ZeRO-{args.zero})")
        print(f"{'':32s} {_why_never(widest, config, gpu_mem, args.zero)}")
    return 0


def _why_never(widest, config, gpu_mem: float, zero: int) -> str:
    """What still fills a GPU at the widest split, and what would shrink it: GPUs
    divide the weights, not a GPU's own micro-batch's activations. ZeRO-3 shards all
    the replicated state already: no higher stage is offered there."""
    usable = 0.9 * gpu_mem
    activations = widest.activations_gb[config.checkpointing]
    held = widest.weights_gb + widest.reference_gb + widest.gradients_gb + widest.optimizer_gb
    if held < usable:  # the activations overflow what the weights leave
        others = ", ".join(f"{mode} {gb:.1f} GB" for mode, gb in widest.activations_gb.items()
                           if mode != config.checkpointing)
        return (f"even then a GPU holds {activations:.1f} GB of activations "
                f"(checkpointing={config.checkpointing}, micro_batch={config.micro_batch}) "
                f"beside {held:.1f} GB of weights, gradients and optimizer state, over the "
                f"{usable:.1f} GB usable: more GPUs do not shrink them; other checkpointing "
                f"modes need {others} (--set checkpointing=...), or lower micro_batch")
    remedy = ("a higher --zero stage shards the replicated ones, or more memory a GPU"
              if zero < 3 else "more memory a GPU (ZeRO-3 shards the replicated ones already)")
    return (f"even then a GPU holds {held:.1f} GB of weights, gradients and optimizer state, "
            f"over the {usable:.1f} GB usable before its {activations:.1f} GB of activations: "
            f"{remedy}")


def register(groups: argparse._SubParsersAction) -> None:
    parser = groups.add_parser("plan", help="estimate memory, communication and GPUs for a config")
    parser.add_argument("--config", help="training config (TOML/YAML) or a shipped config's name: demo "
                        "(default: built-in defaults)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    parser.add_argument("--gpus", type=_count, default=8,
                        help="GPUs to plan for (default 8)")
    parser.add_argument("--gpu-mem", type=_gpu_mem, default="80GB",
                        help="memory per GPU, e.g. 80GB or 80GiB (default 80GB)")
    parser.add_argument("--strategy", choices=("ep", "ddp"), default="ep",
                        help="ep: experts sharded over the GPUs; ddp: full replicas")
    parser.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3),
                        help="ZeRO stage for the replicated parameters (default 0)")
    parser.add_argument("--vocab-size", type=_count,
                        help="vocabulary (default: model_overrides.vocab_size, else, with "
                        "--config or --set data_dir=..., that of the tokenizer prepared in "
                        "data_dir, which `dsv3 train` takes, else the preset's)")
    parser.set_defaults(func=_plan)
