"""Trainer overhead: the same steps (model, batches, optimizer, schedule) through
``dsv3.train.Trainer`` (data loader, metrics every ``log_every`` steps, progress
bar off; its step loop is timed, the end-of-run checkpoint and report aside) and
through a bare loop that only runs forward, backward and the optimizer on batches
prepared in advance; interleaved rounds (after one untimed warm-up round of each;
the order alternates between rounds), medians. Overhead = trainer time / bare
time - 1 (target <= 5%).

    python -m benchmarks.trainer_overhead [--steps 60] [--rounds 3] [--write-results]
"""
import argparse
import dataclasses
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.results import append_section, command_line
from dsv3.data.tokenizer import TokenizedCorpus
from dsv3.moe import moe_aux_loss, moe_update_bias
from dsv3.train.config import OptimConfig, StageConfig, TrainConfig
from dsv3.train.data import TrainData
from dsv3.train.schedule import lr_factor
from dsv3.train.trainer import Trainer


def random_corpus(vocab: int, tokens_per_domain: int = 200_000) -> TokenizedCorpus:
    rng = np.random.default_rng(0)
    tokens, offsets = {}, {}
    for domain in ("a", "b"):
        tokens[domain] = rng.integers(1, vocab, tokens_per_domain).astype(np.uint32)
        offsets[domain] = np.arange(0, tokens_per_domain + 1, 1000, dtype=np.int64)
    return TokenizedCorpus(tokens, offsets, eos_id=0, vocab_size=vocab)


def run_trainer(config, data) -> float:
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = Trainer(dataclasses.replace(config, out_dir=out_dir), data)
        trainer.train(resume=False, progress=False)
        return trainer.loop_seconds  # the step loop; the end-of-run save and report aside


def run_bare(config, data) -> float:
    """What the trainer does per step, minus everything around the math."""
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = Trainer(dataclasses.replace(config, out_dir=out_dir), data)
        model, optimizer = trainer.model, trainer.optimizer
        loader = iter(data.stage_loader(config.stages[0], config.steps, config.micro_batch))
        batches = [next(loader)["input_ids"] for _ in range(config.steps)]
        start = time.perf_counter()
        for step, tokens in enumerate(batches):
            for group in optimizer.param_groups:
                group["lr"] = config.optim.lr * lr_factor(step, config.steps,
                                                          config.optim.warmup_steps)
            logits = model(tokens[:, :-1])
            loss = (F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
                    + moe_aux_loss(model))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            moe_update_bias(model)
        return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="steps per timed run (default: 60)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed rounds of each loop, after one warm-up round (default: 3)")
    parser.add_argument("--log-every", type=int, default=10,
                        help="the trainer's metrics interval in steps (default: 10)")
    parser.add_argument("--write-results", action="store_true",
                        help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1")
    data = TrainData.from_corpus(random_corpus(2048))
    config = TrainConfig(steps=args.steps, micro_batch=16, log_every=args.log_every,
                         model_overrides={"vocab_size": 2048}, optim=OptimConfig(warmup_steps=10),
                         stages=[StageConfig("base", "lm", 1.0, seq_len=128)])
    runners = {"bare": run_bare, "trainer": run_trainer}
    for run in runners.values():  # warm-up: thread pools, allocator, lazily built kernels
        run(config, data)
    times = {"trainer": [], "bare": []}
    for round_ in range(args.rounds):  # alternate which goes first: drift hits both alike
        for name in (("bare", "trainer") if round_ % 2 == 0 else ("trainer", "bare")):
            times[name].append(runners[name](config, data))
    bare, full = statistics.median(times["bare"]), statistics.median(times["trainer"])
    table = ("| loop | s per step | vs bare |\n|---|--:|--:|\n"
             f"| bare (math only) | {bare / args.steps:.4f} | 1.00 |\n"
             f"| dsv3 Trainer (log every {args.log_every}) | {full / args.steps:.4f} | "
             f"{full / bare:.3f} |\n\n"
             f"tiny preset, 16 x 128 tokens, {args.steps} steps, medians of {args.rounds} "
             f"interleaved rounds: trainer overhead {100 * (full / bare - 1):+.1f}% "
             f"(target <= 5%).\n")
    print(table)
    if args.write_results:
        append_section("Trainer overhead (CPU)",
                       command_line("benchmarks.trainer_overhead", argv), table)


if __name__ == "__main__":
    main()
