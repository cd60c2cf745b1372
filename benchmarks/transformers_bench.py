"""A small transformers MoE model on CPU, with each way to run its experts side by side.

    python -m benchmarks.transformers_bench [--models mixtral qwen3_moe gpt_oss]
                                            [--dtypes fp32 bf16]
                                            [--repeats 11] [--write-results]

Providers: transformers' own experts implementations (``eager``: a Python loop over
the hit experts; ``grouped_mm``: torch's grouped GEMM; ``batched_mm``: one bmm over a
per-row gathered copy of the expert weights) against dsv3's two routes
(``dsv3``: experts_implementation="dsv3", the model's router; ``patch_moe``: whole
blocks replaced, routing fused too). Four cases per model and dtype: a training step
(forward + backward of the LM loss, gradients dropped before each), a prefill
(forward under no_grad, eval mode), a decode step (one new token under no_grad
against a KV cache of the prompt, as in generate: few rows per expert, so each op's
fixed cost counts), and one MoE block's forward + backward alone, since at this size
attention, norms and the LM head take most of a model step and dilute the difference
the experts make. Every provider gets its own copy of the same
seeded model; calls are interleaved (a rotating provider order per repeat) so a
burst of load from the other users of the machine hits all of them alike, except
batched_mm's, which disturb the caches of the next call and so run after the rest; the table
reports medians and the ratio of each peer to dsv3 (> 1: dsv3 is faster).
"""
import argparse
import copy
import statistics
import time
from datetime import datetime, timezone

import torch
import transformers

import dsv3.integrations.transformers as dt
from benchmarks import contention
from benchmarks.bench_checks import disagreement
from benchmarks.results import append_text, command_line
from benchmarks.run import CONTENDED_CORES, git_commit, machine

PEERS = ("eager", "grouped_mm", "batched_mm")
OURS = ("dsv3", "patch_moe")
PROVIDERS = PEERS + OURS
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("train", "prefill", "decode", "block")
BATCH, SEQ = 1, 256  # 256 tokens: batched_mm copies one expert weight per routed row (~0.4 GiB)

_COMMON = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=SEQ)
MODELS = {
    # few large experts
    "mixtral": lambda: transformers.MixtralConfig(intermediate_size=512, num_local_experts=8,
                                                  num_experts_per_tok=2, **_COMMON),
    # many small experts, wider top-k
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        intermediate_size=512, moe_intermediate_size=128, num_experts=32, num_experts_per_tok=4,
        head_dim=64, **_COMMON),
    # biased experts, interleaved gate/up, clamped sigmoid-GLU; a biased router
    "gpt_oss": lambda: transformers.GptOssConfig(
        intermediate_size=256, num_local_experts=16, num_experts_per_tok=4, head_dim=64,
        sliding_window=128, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **_COMMON),
}


def build(model_name: str, dtype: torch.dtype, provider: str):
    torch.manual_seed(0)  # the same weights for every provider
    impl = "eager" if provider == "patch_moe" else provider
    model = transformers.AutoModelForCausalLM.from_config(MODELS[model_name](),
                                                          experts_implementation=impl)
    model = model.to(dtype)
    if provider == "patch_moe":
        dt.patch_moe(model)
    return model


# A provider counts as faster only by more than this: medians of a few ms on a shared
# 2-core machine move by a few percent from run to run.
MARGIN = 0.03


def check_providers(model_name: str) -> None:
    """Every provider computes transformers' model: fp32 logits and every gradient of
    the LM loss against eager's (bench_checks' tolerance). A timing of a provider that
    computes something else is no figure: the run stops here, before any timing."""
    ids = torch.randint(0, _COMMON["vocab_size"], (BATCH, 32),
                        generator=torch.Generator().manual_seed(3))

    def outputs(provider):
        model = build(model_name, torch.float32, provider).train()
        out = model(ids, labels=ids)
        out.loss.backward()
        return [out.logits.detach()] + [p.grad for p in model.parameters()]

    truth = outputs("eager")
    for provider in PROVIDERS[1:]:
        wrong = disagreement(outputs(provider), truth)
        if wrong is not None:
            raise SystemExit(f"{model_name}: {provider} disagrees with eager ({wrong}): "
                             f"not timed")


def make_call(model, mode: str, ids: torch.Tensor, n_calls: int):
    if mode == "block":  # layer 0's MoE block alone: what the providers actually change
        model.train()
        block = model.model.layers[0].mlp
        gen = torch.Generator().manual_seed(2)
        dtype = model.lm_head.weight.dtype
        x = torch.randn(*ids.shape, _COMMON["hidden_size"], generator=gen).to(dtype).requires_grad_()
        grad = torch.randn(x.shape, generator=gen).to(dtype)

        def step():
            model.zero_grad(set_to_none=True)
            x.grad = None
            out = block(x)
            # GPT-OSS's block returns (hidden_states, routing weights).
            (out[0] if isinstance(out, tuple) else out).backward(grad)
        return step
    if mode == "decode":
        model.eval()
        with torch.no_grad():
            prompt_cache = model(ids[:, :-1], use_cache=True).past_key_values
        # A fresh copy of the prompt's cache per call, made here, outside the timings:
        # every call decodes the same position. (Cropping the token off again is not
        # possible for GPT-OSS's sliding-window layers once the window is full.)
        caches = [copy.deepcopy(prompt_cache) for _ in range(n_calls)]

        def step():
            with torch.no_grad():
                model(ids[:, -1:], past_key_values=caches.pop(), use_cache=True)
        return step
    if mode == "train":
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids).loss.backward()
    else:
        model.eval()

        def step():
            with torch.no_grad():
                model(ids)
    return step


def time_case(model_name, dtype, mode, repeats, warmup=2) -> dict[str, float]:
    """Median seconds per provider, calls interleaved across providers."""
    ids = torch.randint(0, _COMMON["vocab_size"], (BATCH, SEQ),
                        generator=torch.Generator().manual_seed(1))
    calls = {p: make_call(build(model_name, dtype, p), mode, ids, warmup + repeats)
             for p in PROVIDERS}
    for call in calls.values():
        for _ in range(warmup):
            call()
    times = {p: [] for p in PROVIDERS}

    def timed(p):
        start = time.perf_counter()
        calls[p]()
        times[p].append(time.perf_counter() - start)

    # batched_mm streams a per-row copy of the expert weights (~0.4 GiB) and frees
    # it: whichever provider ran next found cold caches and unmapped memory, which
    # cost it ~0.7 ms on the bf16 Mixtral prefill (measured: 6.0 ms interleaved vs
    # 4.8 ms alone). It is timed after the others instead of between them, except
    # when decoding: one token's copy is K experts' weights, and timed alone, back to
    # back, it found its weights in cache where the interleaved providers did not.
    alone = () if mode == "decode" else ("batched_mm",)
    interleaved = tuple(p for p in PROVIDERS if p not in alone)
    for r in range(repeats):
        for p in interleaved[r % len(interleaved):] + interleaved[:r % len(interleaved)]:
            timed(p)
    for p in alone:
        for _ in range(repeats):
            timed(p)
    return {p: statistics.median(t) for p, t in times.items()}


def verdict(s: dict, contended: bool = False) -> str:
    """Whether dsv3's routes beat every peer, by more than MARGIN; none on a shared run."""
    if contended:
        return "–"
    best_peer = min(s[p] for p in PEERS)
    faster = [o for o in OURS if s[o] * (1 + MARGIN) < best_peer]
    if len(faster) == len(OURS):
        return "✓ both routes"
    if faster:
        return "✓ one route"
    if min(s[o] for o in OURS) < best_peer * (1 + MARGIN):
        return f"≈ (within {MARGIN:.0%})"
    return "✗"


def markdown_table(rows, contended: bool = False) -> str:
    lines = ["| model | dtype | case | " + " | ".join(f"{p} ms" for p in PROVIDERS)
             + " | " + " | ".join(f"{p}/dsv3" for p in PEERS)
             + " | patch_moe/dsv3 | dsv3 fastest |",
             "|---|---|---|" + "--:|" * (len(PROVIDERS) + len(PEERS) + 2)]
    for row in rows:
        s = row["median_s"]
        lines.append(f"| {row['model']} | {row['dtype']} | {row['mode']} | "
                     + " | ".join(f"{s[p] * 1e3:.1f}" for p in PROVIDERS) + " | "
                     + " | ".join(f"{s[p] / s['dsv3']:.2f}" for p in PEERS)
                     + f" | {s['patch_moe'] / s['dsv3']:.2f} | {verdict(s, contended)} |")
    return "\n".join(lines)


def report(rows, info) -> str:
    m, foreign = info["machine"], info["foreign_cores"]
    return "\n".join([
        f"## transformers integration, CPU · {info['date']} · commit {info['commit']}", "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads, "
        f"{m['cpu_capability']}), torch {m['torch']}, transformers {transformers.__version__}. "
        f"`{info['command']}`, wall time {info['wall_s'] / 60:.1f} min.", "",
        f"Models: 2 decoder layers, D=256, vocab 1024, {BATCH}x{SEQ} tokens; mixtral: E=8 "
        f"experts of F=512, top-2; qwen3_moe: E=32 of F=128, top-4; gpt_oss: E=16 of F=256, "
        f"top-4 (biased experts, clamped sigmoid-GLU). train = forward + backward "
        f"of the LM loss; prefill = forward under no_grad; decode = one token's forward "
        f"under no_grad after the other {SEQ - 1} (KV cache); block = forward + backward of one "
        f"MoE block alone (router, experts), the part the providers change.", "",
        markdown_table(rows, foreign > CONTENDED_CORES), "",
        f"- Medians of {info['repeats']} interleaved calls per provider after 2 warm-up calls "
        "(batched_mm's after the others, except in decode: its weight copies leave the next "
        "call cold caches); "
        "ratios > 1 mean dsv3 (experts_implementation=\"dsv3\") is faster; a route counts "
        f"as faster than every peer only by more than {MARGIN:.0%}. Before any timing, every "
        "provider's fp32 logits and gradients were checked against eager's.",
        f"- Other processes used {foreign:.2f} cores on average during the timings"
        + (": **measured while the machine was shared**: interleaving spreads the load "
           "over the providers, but it changed within cases, so ratios are noisy; no "
           "verdicts." if foreign > CONTENDED_CORES else " (quiet)."), ""])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--repeats", type=int, default=11,
                        help="timed calls per provider and case, after 2 warm-up calls "
                             "(default: 11)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice, one per core)")
    parser.add_argument("--write-results", action="store_true",
                        help="append the section to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started, before = time.monotonic(), contention.snapshot()
    rows = []
    for model_name in args.models:
        check_providers(model_name)
        for dtype_name in args.dtypes:
            for mode in args.modes:
                median_s = time_case(model_name, DTYPES[dtype_name], mode, args.repeats)
                rows.append({"model": model_name, "dtype": dtype_name, "mode": mode,
                             "median_s": median_s})
                print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
    info = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git_commit(), "machine": machine(), "repeats": args.repeats,
            "command": command_line("benchmarks.transformers_bench", argv),
            "wall_s": time.monotonic() - started,
            "foreign_cores": contention.foreign_cores(before, contention.snapshot())}
    section = report(rows, info)
    print("\n" + section)
    if args.write_results:
        append_text(section)


if __name__ == "__main__":
    main()
