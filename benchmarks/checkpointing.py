"""Activation checkpointing, side by side in one run: saved activation bytes
(counted directly: every tensor autograd keeps for the backward, parameters
excluded; what selective checkpointing caches included) and fwd+bwd step time of
the same model and batch with ``none``, ``selective`` and ``full``.

    python -m benchmarks.checkpointing [--preset small] [--batch 8] [--seq 256] [--rounds 7]
                                        [--write-results]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.results import append_section, command_line
from dsv3.model import Transformer, preset
from dsv3.train.metrics import saved_activation_bytes

MODES = ("none", "selective", "full")


def step(model, tokens):
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", help="model preset (default: small)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (default: 8)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--rounds", type=int, default=7,
                        help="timed interleaved rounds (default: 7)")
    parser.add_argument("--write-results", action="store_true",
                        help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = Transformer(preset(args.preset)).train()
    tokens = torch.randint(0, model.config.vocab_size, (args.batch, args.seq + 1))
    saved, times = {}, {mode: [] for mode in MODES}
    for mode in MODES:
        model.set_checkpointing(mode)
        counter = [0]
        with saved_activation_bytes(counter, model):
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)
        saved[mode] = counter[0]
        step(model, tokens)  # warm-up
        model.zero_grad(set_to_none=True)
    for _ in range(args.rounds):  # interleaved rounds: drift hits every mode alike
        for mode in MODES:
            model.set_checkpointing(mode)
            start = time.perf_counter()
            step(model, tokens)
            times[mode].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    lines = [f"{args.preset} preset, batch {args.batch} x {args.seq} tokens, fp32, "
             f"{torch.get_num_threads()} threads, medians of {args.rounds} interleaved rounds.", "",
             "| checkpointing | saved activations MiB | vs none | fwd+bwd ms | time vs none |",
             "|---|--:|--:|--:|--:|"]
    base_ms = statistics.median(times["none"]) * 1e3
    for mode in MODES:
        ms = statistics.median(times[mode]) * 1e3
        lines.append(f"| {mode} | {saved[mode] / 2**20:.1f} | {saved[mode] / saved['none']:.2f} | "
                     f"{ms:.0f} | {ms / base_ms:.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write_results:
        append_section("Activation checkpointing (CPU)",
                       command_line("benchmarks.checkpointing", argv), table)


if __name__ == "__main__":
    main()
