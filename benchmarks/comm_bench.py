"""Gradient all-reduce compression, side by side on one model and one data stream:
fp32 all-reduce, bf16 (torch's ``bf16_compress_hook``), PowerSGD (torch's
``powerSGD_hook``, rank 1) and dsv3's ``int8_compress_hook``, each training the same
small MoE language model under DDP on W gloo ranks over 127.0.0.1.

Bytes on the wire are counted, not estimated from a formula after the fact: every
collective call of the run goes through a counting wrapper that adds what this
rank sends under the usual algorithm (ring all-reduce: 2 (W-1)/W of the buffer;
all-gather: the input to W-1 peers; all-to-all: (W-1)/W of the input). Per step:
the median over the steps after every method's warm-up.

    python -m benchmarks.comm_bench [--steps 200] [--world 2] [--write-results]
"""
import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import dsv3
from benchmarks.results import append_section, command_line
from dsv3.distributed import CompressionState, int8_compress_hook

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench-out"
VOCAB, DIM, SEQ, BATCH, WARMUP = 256, 64, 32, 8, 10
METHODS = ("fp32", "bf16", "powersgd", "dsv3_int8")
_SENT = [0]


class MoELM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.norm = nn.RMSNorm(DIM)
        self.moe = dsv3.MoE(dsv3.MoEConfig(dim=DIM, ffn_dim=2 * DIM, n_experts=8, top_k=2))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens_BS):
        h = self.embed(tokens_BS)
        return self.head(h + self.moe(self.norm(h)))


def batch(step: int, rank: int):
    """A learnable toy language: next = (5 * token + 3) mod V, 10% noise."""
    gen = torch.Generator().manual_seed(step * 1000 + rank)
    tokens = [torch.randint(VOCAB, (BATCH, 1), generator=gen)]
    for _ in range(SEQ):
        noise = torch.rand(BATCH, 1, generator=gen) < 0.1
        tokens.append(torch.where(noise, torch.randint(VOCAB, (BATCH, 1), generator=gen),
                                  (5 * tokens[-1] + 3) % VOCAB))
    seq = torch.cat(tokens, 1)
    return seq[:, :-1], seq[:, 1:]


def _count_collectives(world: int) -> None:
    def counting(fn, sent):
        def wrapped(*args, **kwargs):
            _SENT[0] += sent(*args, **kwargs)
            return fn(*args, **kwargs)
        return wrapped

    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    dist.all_reduce = counting(dist.all_reduce, lambda t, *a, **k: 2 * (world - 1) * nbytes(t) // world)
    dist.all_gather = counting(dist.all_gather, lambda out, t, *a, **k: (world - 1) * nbytes(t))
    dist.all_to_all_single = counting(dist.all_to_all_single,
                                      lambda out, t, *a, **k: (world - 1) * nbytes(t) // world)


def _register(model: DDP, method: str):
    if method == "fp32":
        model.register_comm_hook(None, default_hooks.allreduce_hook)
    elif method == "bf16":
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif method == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1,
                                            start_powerSGD_iter=WARMUP)
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    else:
        model.register_comm_hook(CompressionState(start_iter=WARMUP), int8_compress_hook)


def _train(rank: int, method: str, steps: int) -> dict:
    torch.manual_seed(0)
    model = DDP(MoELM())
    _register(model, method)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, times, sent = [], [], []
    for step in range(steps):
        inputs, targets = batch(step, rank)
        before, start = _SENT[0], time.perf_counter()
        loss = nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        (loss + dsv3.moe_aux_loss(model)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        sent.append(_SENT[0] - before)
        losses.append(loss.item())
    steady = slice(2 * WARMUP, None)
    return {"bytes_per_step": statistics.median(sent[steady]),
            "step_ms": 1e3 * statistics.median(times[steady]), "step_s": times[steady],
            "final_loss": statistics.fmean(losses[-20:]), "first_loss": losses[0],
            "params": sum(p.numel() for p in model.parameters())}


def _worker(rank: int, world: int, port: int, steps: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _count_collectives(world)
    results, step_s = {}, {method: [] for method in METHODS}
    # Two interleaved rounds: each method's step time is the median of both rounds' steps
    # together (it was the better round's median, a best-of-two), its bytes and losses the
    # first round's (the same seeded run twice).
    for _ in range(2):
        for method in METHODS:
            result = _train(rank, method, steps)
            step_s[method] += result.pop("step_s")
            results.setdefault(method, result)
    for method, times in step_s.items():
        results[method]["step_ms"] = 1e3 * statistics.median(times)
    if rank == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


def markdown(results: dict, world: int, steps: int) -> str:
    fp32 = results["fp32"]
    lines = [f"W={world} gloo ranks on 127.0.0.1, {steps} steps, model "
             f"{fp32['params']:,} parameters (1 MoE layer, 8 experts, top-2).", "",
             "| method | bytes/step | vs fp32 | step ms | final loss | vs fp32 loss |",
             "|---|--:|--:|--:|--:|--:|"]
    for method, r in results.items():
        lines.append(f"| {method} | {r['bytes_per_step']:,.0f} | "
                     f"{r['bytes_per_step'] / fp32['bytes_per_step']:.3f} | {r['step_ms']:.1f} | "
                     f"{r['final_loss']:.4f} | {r['final_loss'] / fp32['final_loss'] - 1:+.2%} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args(argv)
    if args.steps <= 2 * WARMUP + 20:
        parser.error(f"--steps must be > {2 * WARMUP + 20} (warm-up plus a measured window)")
    OUT_DIR.mkdir(exist_ok=True)
    out_path = OUT_DIR / "comm.json"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_worker, args=(args.world, port, args.steps, str(out_path)), nprocs=args.world)
    results = json.loads(out_path.read_text())
    table = markdown(results, args.world, args.steps)
    (OUT_DIR / "comm.md").write_text(table)
    print(table)
    if args.write_results:
        append_section("Gradient compression (CPU, gloo)",
                       command_line("benchmarks.comm_bench", argv), table)

if __name__ == "__main__":
    main()
