"""Per-rank bodies of the distributed tests (run by tests/rank_runner.run_ranks in
spawned processes, so they live in an importable module). Every rank can rebuild
every other rank's inputs from seeds, so each one checks the collective result
against the exact answer itself."""
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import dsv3
from dsv3.distributed import CompressionState, compressed_all_reduce, int8_compress_hook


def rank_tensor(n: int, rank: int, salt: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * salt + 17 * n + rank)
    return torch.randn(n, generator=gen) * torch.logspace(-2, 1, n)[torch.randperm(n, generator=gen)]


def block_amax(x_N: torch.Tensor, block: int) -> torch.Tensor:
    """max |x| of each value's block, per value."""
    n = x_N.numel()
    padded = torch.nn.functional.pad(x_N.abs(), (0, -(-n // block) * block - n))
    return padded.view(-1, block).amax(1).repeat_interleave(block)[:n]


# --- compressed all-reduce ---------------------------------------------------------------------
def assert_within_bound(got_N, inputs, block, average=False, what=""):
    """Phase 1 loses <= half a level of each rank's block, phase 2 half a level of the
    reduced block (whose max is at most the exact one's plus phase 1's error)."""
    world = len(inputs)
    exact_N = torch.stack(inputs).sum(0) / (world if average else 1)
    phase1_N = sum(block_amax(x, block) for x in inputs) / 254 / (world if average else 1)
    bound_N = phase1_N + (block_amax(exact_N, block) + phase1_N) / 254
    excess = ((got_N - exact_N).abs() - bound_N * (1 + 1e-5) - 1e-6).max().item()
    assert excess <= 0, f"{what}: error exceeds its bound by {excess}"


def check_compressed_all_reduce(rank, world):
    block = 256
    for n in (1, 100, 5000, 100_000):
        state = CompressionState(block_size=block, start_iter=0)
        inputs = [rank_tensor(n, r) for r in range(world)]
        got_N = compressed_all_reduce(inputs[rank].clone(), state)
        assert_within_bound(got_N, inputs, block, what=f"n={n}")
        # Every rank ends with the same bits.
        gathered = [torch.empty_like(got_N) for _ in range(world)]
        dist.all_gather(gathered, got_N)
        assert all(torch.equal(g, gathered[0]) for g in gathered), f"n={n}: ranks disagree"
        if n == 100_000:
            assert state.stats.compression_ratio <= 0.27, state.stats.compression_ratio
            # Values spread over three decades within a block: a few % of quantization error.
            assert 0 < state.stats.relative_error < 0.05, state.stats.relative_error
    # average=True divides by the world size; the tensor is reduced in place.
    inputs = [rank_tensor(3000, r, salt=1) for r in range(world)]
    mean_N = compressed_all_reduce(inputs[rank].clone(), CompressionState(start_iter=0),
                                   average=True)
    assert_within_bound(mean_N, inputs, 256, average=True, what="average")
    # A bf16 tensor is reduced in place and keeps its dtype: the fp32 result, rounded.
    x_N = inputs[rank].to(torch.bfloat16)
    want_N = compressed_all_reduce(x_N.float(), CompressionState(start_iter=0), average=True)
    out = compressed_all_reduce(x_N, CompressionState(start_iter=0), average=True)
    assert out is x_N and x_N.dtype == torch.bfloat16
    assert torch.equal(x_N, want_N.to(torch.bfloat16))
    # Warm-up: uncompressed (exact up to fp32 summation) until start_iter.
    state = CompressionState(start_iter=2)
    x_N = rank_tensor(1000, rank, salt=2)
    compressed_all_reduce(x_N, state)
    torch.testing.assert_close(x_N, torch.stack([rank_tensor(1000, r, salt=2)
                                                 for r in range(world)]).sum(0))
    assert state.stats.compression_ratio == 1.0
    # A strided fp32 view in the warm-up: its values reduced, its base's others untouched
    # (.float() of fp32 is the view itself, which gloo reduced over the wrong memory).
    base_N = rank_tensor(1000, rank, salt=4)
    before_N = base_N.clone()
    view_N = base_N[::2]
    compressed_all_reduce(view_N, CompressionState(start_iter=1), average=True)
    torch.testing.assert_close(view_N, torch.stack([rank_tensor(1000, r, salt=4)[::2]
                                                    for r in range(world)]).mean(0))
    assert torch.equal(base_N[1::2], before_N[1::2])


def check_shared_state_warns(rank, world):
    """A state whose keys alternate between steps (two models sharing it) frees the
    residuals every step: a warning says so, once. One model's keys, even after a
    one-time change of layout (DDP's bucket rebuild), give none."""
    def run(keys):
        state = CompressionState(start_iter=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for key in keys:
                compressed_all_reduce(rank_tensor(300, rank), state, key=key)
                state.step()
        return [str(w.message) for w in caught if "shared by two models" in str(w.message)]

    assert run(["a"] * 5) == []
    assert run(["a", "a", "b", "b", "b"]) == []  # one rebuild frees once
    assert len(run(["a", "b", "a", "b", "a", "b"])) == 1


def check_error_feedback(rank, world):
    """Reducing the same gradients step after step: with error feedback the summed
    error stays bounded (its mean over steps goes to 0); without, it grows linearly."""
    steps, n = 40, 3000
    exact_N = torch.stack([rank_tensor(n, r, salt=3) for r in range(world)]).sum(0)
    with_feedback = CompressionState(start_iter=0)
    total_fb = torch.zeros(n)
    total_plain = torch.zeros(n)
    first_error = None
    for step in range(steps):
        total_fb += compressed_all_reduce(rank_tensor(n, rank, salt=3), with_feedback)
        fresh = CompressionState(start_iter=0)  # no residual carried over
        total_plain += compressed_all_reduce(rank_tensor(n, rank, salt=3), fresh)
        if step == 0:
            first_error = (total_fb - exact_N).norm().item()
    error_fb = (total_fb - steps * exact_N).norm().item()
    error_plain = (total_plain - steps * exact_N).norm().item()
    assert error_fb <= 3 * first_error, (error_fb, first_error)
    assert error_fb / steps < first_error / 10  # the mean error goes to zero
    assert error_plain > 10 * error_fb  # and without feedback it accumulates
    # The residuals are saved and restored with checkpoints: a restored state continues
    # exactly as the original.
    restored = CompressionState(start_iter=0)
    restored.load_state_dict(with_feedback.state_dict())
    a = compressed_all_reduce(rank_tensor(n, rank, salt=4), with_feedback)
    b = compressed_all_reduce(rank_tensor(n, rank, salt=4), restored)
    assert torch.equal(a, b)


def check_failures(rank, world):
    # A tensor of another size on one rank: every rank gets a ValueError naming the sizes.
    state = CompressionState(start_iter=0)
    try:
        compressed_all_reduce(torch.randn(100 + rank), state)
    except ValueError as error:
        assert "same number of elements on every rank" in str(error), error
    else:
        raise AssertionError("a size mismatch was not detected")
    # A rank that is gone: the others get a clear error once the collective fails.
    if rank == world - 1:
        return
    try:
        compressed_all_reduce(torch.randn(100), state)
    except RuntimeError as error:
        assert "a rank may have died" in str(error), error
    else:
        raise AssertionError("a missing rank was not detected")



def check_local_errors_and_divergent_states(rank, world):
    # A parameter passed instead of its gradient: a TypeError naming tensor, on each
    # rank before any collective (it used to read "a collective failed (a rank may have
    # died ...)").
    for start_iter in (1, 0):  # warm-up and compressing
        state = CompressionState(start_iter=start_iter)
        try:
            compressed_all_reduce(nn.Parameter(torch.randn(300)), state)
        except TypeError as error:
            assert "tensor must not require grad" in str(error), error
        else:
            raise AssertionError("a tensor that requires grad was accepted")
    # A local failure inside keeps its own message: only the collectives are said to fail.
    from dsv3 import ops
    quantize = ops.quantize_int8
    ops.quantize_int8 = lambda *args: (_ for _ in ()).throw(RuntimeError("out of memory"))
    try:
        compressed_all_reduce(torch.randn(300), CompressionState(start_iter=0))
    except RuntimeError as error:
        assert str(error) == "out of memory", error
    else:
        raise AssertionError("the local error was lost")
    finally:
        ops.quantize_int8 = quantize
    # Ranks that disagree on compressing (states restored from different steps): a
    # ValueError naming each rank's iteration, where they used to hang in mismatched
    # collectives until the timeout.
    state = CompressionState(start_iter=5, iteration=4 + rank)
    try:
        compressed_all_reduce(torch.ones(1024), state)
    except ValueError as error:
        assert "disagree on compressing: state.iteration [4, 5]" in str(error), error
    else:
        raise AssertionError("ranks disagreeing on compressing were not detected")
    # An empty tensor is reduced (to itself) compressing as in the warm-up.
    for start_iter in (1, 0):
        empty = torch.empty(0)
        assert compressed_all_reduce(empty, CompressionState(start_iter=start_iter)) is empty


def save_compression_state(rank, world, path):
    state = CompressionState(start_iter=0)
    compressed_all_reduce(rank_tensor(1000, rank), state)
    state.step()
    torch.save(state.state_dict(), f"{path}/compression{rank}.pt")


def check_resume_at_another_world_size(rank, world, path):
    """A state saved at world size 4 resumed at 2 (an elastic restart): its residuals
    belong to another split of the tensor, so they are dropped with a warning; an old
    checkpoint without the world size is caught by the residuals' sizes. Both reduce
    as a fresh state would (it used to fail inside quantize_int8 after phase 1's
    collectives, with a message about error_N)."""
    import warnings
    saved = torch.load(f"{path}/compression{rank}.pt")
    want_N = compressed_all_reduce(rank_tensor(1000, rank, salt=1), CompressionState(start_iter=0))
    resumed = CompressionState(start_iter=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.load_state_dict(saved)
    assert any("saved at world size 4, this run has 2" in str(w.message) for w in caught), caught
    assert resumed.residuals == {} and resumed.iteration == 1
    assert torch.equal(compressed_all_reduce(rank_tensor(1000, rank, salt=1), resumed), want_N)
    del saved["world_size"]  # as written before the world size was saved
    resumed = CompressionState(start_iter=0)
    resumed.load_state_dict(saved)
    assert torch.equal(compressed_all_reduce(rank_tensor(1000, rank, salt=1), resumed), want_N)


def check_restart_frees_stale_residuals(rank, world):
    """DDP's first step after a restart runs its initial one-bucket layout, a key of
    its own: that residual is freed once the rebuilt buckets return, where it used to
    stay in the state (and every checkpoint) for good, one more per restart. The saved
    buckets' residuals survive the first step."""
    def ddp_model(state):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(600, 600, bias=False), nn.Linear(600, 600, bias=False))
        model = DDP(net, bucket_cap_mb=1)  # two buckets once rebuilt, one at first
        model.register_comm_hook(state, int8_compress_hook)
        return model

    def train_step(model, step):
        model(torch.randn(4, 600, generator=torch.Generator().manual_seed(step))).sum().backward()

    state = CompressionState(start_iter=2)
    model = ddp_model(state)
    for step in range(4):
        train_step(model, step)
    saved_keys = set(state.residuals)
    assert len(saved_keys) == 2, saved_keys  # the two rebuilt buckets
    resumed = CompressionState(start_iter=2)
    resumed.load_state_dict(state.state_dict())
    model = ddp_model(resumed)
    train_step(model, 4)  # the initial layout: a new key, the saved ones spared
    assert saved_keys < set(resumed.residuals) and len(resumed.residuals) == 3, resumed.residuals
    train_step(model, 5)  # the rebuilt buckets: the initial layout's residual is freed
    assert set(resumed.residuals) == saved_keys, resumed.residuals


# --- DDP training with the hook ------------------------------------------------------------------
VOCAB, DIM, SEQ, BATCH = 48, 32, 16, 8


class TinyMoELM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.norm = nn.RMSNorm(DIM)
        self.moe = dsv3.MoE(dsv3.MoEConfig(dim=DIM, ffn_dim=2 * DIM, n_experts=4, top_k=2))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens_BS):
        h = self.embed(tokens_BS)
        return self.head(h + self.moe(self.norm(h)))


def lm_batch(step: int, rank: int):
    """A learnable toy language: next = (5 * token + 3) mod V, with 10% noise."""
    gen = torch.Generator().manual_seed(step * 1000 + rank)
    start = torch.randint(VOCAB, (BATCH, 1), generator=gen)
    tokens = [start]
    for _ in range(SEQ):
        nxt = (5 * tokens[-1] + 3) % VOCAB
        noise = torch.rand(BATCH, 1, generator=gen) < 0.1
        tokens.append(torch.where(noise, torch.randint(VOCAB, (BATCH, 1), generator=gen), nxt))
    seq = torch.cat(tokens, 1)
    return seq[:, :-1], seq[:, 1:]


def train(rank, steps, hook=None, accumulate=1, autocast=False):
    torch.manual_seed(0)
    model = DDP(TinyMoELM())
    state = None
    if hook is not None:
        state = CompressionState(start_iter=10)
        model.register_comm_hook(state, hook)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        for micro in range(accumulate):
            inputs, targets = lm_batch(step * accumulate + micro, rank)
            sync = micro == accumulate - 1
            with (model.no_sync() if not sync else torch.enable_grad()), \
                    torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                logits = model(inputs)
                loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
                (loss + dsv3.moe_aux_loss(model)).div(accumulate).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, state


def check_ddp_hook_training(rank, world):
    steps = 300
    plain, _ = train(rank, steps)
    compressed, state = train(rank, steps, hook=int8_compress_hook)
    assert state.iteration == steps and state.stats.compression_ratio < 0.3
    final_plain = sum(plain[-30:]) / 30
    final_compressed = sum(compressed[-30:]) / 30
    assert final_plain < 0.6 * plain[0], ("the model did not learn", plain[0], final_plain)
    gap = abs(final_compressed - final_plain) / final_plain
    assert gap < 0.01, f"int8 final loss {final_compressed:.4f} vs fp32 {final_plain:.4f}"


def check_ddp_hook_accumulation_and_amp(rank, world):
    # Under no_sync the hook runs only on the synchronizing micro-batch: one state step
    # per optimizer step.
    losses, state = train(rank, 15, hook=int8_compress_hook, accumulate=3)
    assert state.iteration == 15
    # bf16 autocast: the hook reduces the fp32 gradients of the autocast run.
    losses, state = train(rank, 25, hook=int8_compress_hook, autocast=True)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert state.iteration == 25


# --- expert parallelism ---------------------------------------------------------------------------
def check_expert_parallel(rank, world, config_kwargs, starve_last_rank=False, empty_rank=None):
    """EP layer on each rank's own tokens == the single-process layer on all ranks'
    tokens concatenated: outputs, d(x) and the expert gradients bit for bit (fp32).
    ``empty_rank`` gets no tokens (an uneven last batch): it still serves the others'."""
    config = dsv3.MoEConfig(**config_kwargs)
    torch.manual_seed(0)
    full = dsv3.MoE(config)
    ep = dsv3.MoE(config, ep_group=dist.group.WORLD)
    local = ep.expert_range
    with torch.no_grad():
        ep.router.weight.copy_(full.router.weight)
        ep.gate_up_proj.copy_(full.gate_up_proj[local.start:local.stop])
        ep.down_proj.copy_(full.down_proj[local.start:local.stop])
        if config.n_shared_experts:
            ep.shared_experts.load_state_dict(full.shared_experts.state_dict())
        if starve_last_rank:  # route every token away from the last rank's experts
            bias = torch.zeros(config.n_experts)
            bias[:config.n_experts - len(local)] = 100.0
            full.expert_bias.copy_(bias)
            ep.expert_bias.copy_(bias)
    xs = [torch.randn(0 if r == empty_rank else 10 + 3 * r, config.dim,
                      generator=torch.Generator().manual_seed(r)) for r in range(world)]
    grads = [torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + r))
             for r, x in enumerate(xs)]
    x_full = torch.cat(xs).requires_grad_()
    y_full = full(x_full)
    (y_full * torch.cat(grads)).sum().backward()
    x_mine = xs[rank].clone().requires_grad_()
    y_mine = ep(x_mine)
    (y_mine * grads[rank]).sum().backward()

    mine = slice(sum(x.shape[0] for x in xs[:rank]), sum(x.shape[0] for x in xs[:rank + 1]))
    assert torch.equal(y_mine, y_full[mine].detach()), "EP output differs from single-process"
    assert torch.equal(x_mine.grad, x_full.grad[mine]), "EP d(x) differs"
    assert torch.equal(ep.gate_up_proj.grad, full.gate_up_proj.grad[local.start:local.stop])
    assert torch.equal(ep.down_proj.grad, full.down_proj.grad[local.start:local.stop])
    if starve_last_rank and rank == world - 1:
        assert (ep.gate_up_proj.grad == 0).all() and (ep.down_proj.grad == 0).all()
    if rank == empty_rank:
        assert y_mine.shape == (0, config.dim) and ep.gate_up_proj.grad.abs().sum() > 0
    # The router is replicated: its gradient summed over ranks is the full one (summed
    # in another order, so to rounding).
    router_grad = ep.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    torch.testing.assert_close(router_grad, full.router.weight.grad)


def check_expert_parallel_under_ddp(rank, world):
    """EP experts stay rank-local under DDP (ignored), the router is averaged."""
    from dsv3.distributed import ddp_ignore_expert_parameters
    config = dsv3.MoEConfig(dim=16, ffn_dim=24, n_experts=4, top_k=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), dsv3.MoE(config, ep_group=dist.group.WORLD))
    assert ddp_ignore_expert_parameters(model) == ["1.gate_up_proj", "1.down_proj"]
    ddp = DDP(model)
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(rank))
    ddp(x).square().sum().backward()
    expert_grad = model[1].gate_up_proj.grad.clone()
    router_grad = model[1].router.weight.grad.clone()
    # DDP averaged the router's gradient: the same on every rank ...
    gathered = [torch.empty_like(router_grad) for _ in range(world)]
    dist.all_gather(gathered, router_grad)
    assert all(torch.equal(g, gathered[0]) for g in gathered)
    # ... and left the local experts' gradients alone (each rank's own experts).
    gathered = [torch.empty_like(expert_grad) for _ in range(world)]
    dist.all_gather(gathered, expert_grad)
    assert not torch.equal(gathered[0], gathered[1])
    # A rank with an empty batch still uses every parameter (DDP would otherwise fail
    # the next forward, or wait for the router's gradient), and the replicas agree.
    for step in range(2):
        x = torch.randn(0 if rank == 1 and step == 0 else 12, 16)
        ddp(x).square().sum().backward()
    router_grad = model[1].router.weight.grad
    gathered = [torch.empty_like(router_grad) for _ in range(world)]
    dist.all_gather(gathered, router_grad)
    assert all(torch.equal(g, gathered[0]) for g in gathered)


def check_plain_ddp_with_an_empty_rank(rank, world):
    """Plain DDP (no expert parallelism) where rank 1's batch is empty: its layer left
    the experts' weights out of the graph, so DDP failed the next step with "Expected
    to have finished reduction in the prior iteration". Every rank now takes two steps,
    and each parameter's gradient is the same on every rank (the average over them)."""
    config = dsv3.MoEConfig(dim=8, ffn_dim=8, n_experts=4, n_shared_experts=1)
    torch.manual_seed(0)
    ddp = DDP(dsv3.MoE(config))
    for step in range(2):
        ddp.zero_grad()
        x = torch.randn(0 if rank == 1 else 5, 8, generator=torch.Generator().manual_seed(step))
        (ddp(x).sum() + dsv3.moe_aux_loss(ddp)).backward()
        for name, parameter in ddp.module.named_parameters():
            gathered = [torch.empty_like(parameter.grad) for _ in range(world)]
            dist.all_gather(gathered, parameter.grad)
            assert all(torch.equal(g, gathered[0]) for g in gathered), (step, name)
            assert gathered[0].abs().sum() > 0, (step, name)  # rank 0's tokens, halved


def ep_groups(ep_size: int):
    """The world split in expert-parallel groups of ``ep_size`` consecutive ranks (every
    rank makes every group, as new_group requires); this rank's group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = [dist.new_group(list(range(start, start + ep_size))) if ep_size < world
              else dist.group.WORLD for start in range(0, world, ep_size)]
    return groups[rank // ep_size]


def check_expert_parallel_grads_under_ddp(rank, world, ep_size):
    """Under DDP, an EP model's gradients equal those of the same model without EP
    (DDP averaging every parameter), with gradient accumulation, and with ep_groups
    smaller than the world (the expert shards replicated world / ep_size times). The
    expert gradients used to be the ep_group's sum, not the mean over the world, and
    the replicas of a shard were never reduced: they diverged from the first step."""
    from dsv3.distributed import ddp_ignore_expert_parameters
    config = dsv3.MoEConfig(dim=16, ffn_dim=24, n_experts=4, top_k=2, n_shared_experts=1,
                            aux_loss_coef=0.0)
    torch.manual_seed(0)
    full = nn.Sequential(nn.Linear(16, 16), dsv3.MoE(config))
    ep = nn.Sequential(nn.Linear(16, 16), dsv3.MoE(config, ep_group=ep_groups(ep_size)))
    local = ep[1].expert_range
    experts = ("1.gate_up_proj", "1.down_proj")
    ep.load_state_dict({name: value[local.start:local.stop] if name in experts else value
                        for name, value in full.state_dict().items()})
    ep.register_buffer("unused", torch.zeros(1))
    DDP._set_params_and_buffers_to_ignore_for_model(ep, ["unused"])
    ddp_ignore_expert_parameters(ep)
    assert ddp_ignore_expert_parameters(ep) == list(experts)  # again: no double scaling
    assert ep._ddp_params_and_buffers_to_ignore == ["unused", *experts]  # extended
    full_ddp, ep_ddp = DDP(full), DDP(ep)
    for micro in range(2):  # gradient accumulation: the first micro-batch under no_sync
        x = torch.randn(6 + rank, 16, generator=torch.Generator().manual_seed(10 * micro + rank))
        for model in (full_ddp, ep_ddp):
            with model.no_sync() if micro == 0 else torch.enable_grad():
                model(x).square().mean().backward()
    want = dict(full.named_parameters())
    for name, param in ep.named_parameters():
        want_grad = want[name].grad
        if name in experts:
            want_grad = want_grad[local.start:local.stop]
        torch.testing.assert_close(param.grad, want_grad, msg=lambda m: f"{name}: {m}")


def check_trainer_ddp(rank, world, out_dir, compress):
    """The trainer under DDP (gloo), with or without the int8 hook: it trains, the
    replicas stay identical, and the hook's traffic is counted."""
    from dsv3.train.config import OptimConfig, StageConfig
    from dsv3.train.trainer import Trainer
    from train_support import synthetic_data, three_stage_config
    config = three_stage_config(f"{out_dir}/{rank}", steps=12, compress_grads=compress,
                                compress_start_iter=3, optim=OptimConfig(warmup_steps=2),
                                stages=[StageConfig("base", "lm", 1.0, seq_len=24)])
    trainer = Trainer(config, synthetic_data())
    history = trainer.train(progress=False)
    assert trainer.ddp is not None and history[-1]["loss"] < history[0]["loss"]
    checksum = torch.stack([p.detach().double().sum() for p in trainer.model.parameters()])
    gathered = [torch.empty_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    assert torch.equal(gathered[0], gathered[1]), "DDP replicas diverged"
    if compress:  # the last window's figures (the stats restart at each log)
        assert trainer.compression.iteration == 12
        assert 0 < history[-1]["comm_ratio"] < 1 and trainer.compression.stats.calls == 0


def check_block_sizes_and_fp64_warm_up(rank, world):
    """Ranks with different block sizes: a ValueError naming state.block_size on every
    rank, where the all-to-all ran with mismatched sizes and gloo aborted the process.
    And an fp64 tensor in the warm-up is reduced in fp64, as the plain all_reduce it
    stands in for (it was rounded through fp32); compressed, a value beyond fp32's range
    spoils only its own block."""
    state = CompressionState(start_iter=0, block_size=256 if rank == 0 else 128)
    try:
        compressed_all_reduce(torch.ones(1024), state)
    except ValueError as error:
        assert "state.block_size must be the same on every rank, got [256, 128]" in str(error)
    else:
        raise AssertionError("ranks with different block sizes were not detected")
    x = torch.full((4,), 1.0 + 1e-12, dtype=torch.float64) * (rank + 1)
    plain = x.clone()
    dist.all_reduce(plain)
    warm = compressed_all_reduce(x.clone(), CompressionState(start_iter=10))
    assert warm.dtype == torch.float64 and torch.equal(warm, plain), (warm - plain).abs().max()
    # Compressed, fp64 goes through fp32 (README): a value beyond fp32's range makes its
    # own block of the sum NaN, as an overflow does, and leaves the other blocks right.
    wide = torch.ones(1024, dtype=torch.float64)
    wide[300] = 1e300 if rank == 0 else 1.0
    summed = compressed_all_reduce(wide, CompressionState(start_iter=0, block_size=256))
    assert torch.isnan(summed[256:512]).all(), summed[256:512]
    assert torch.equal(summed[:256], torch.full((256,), 2.0, dtype=torch.float64))
    assert torch.equal(summed[512:], torch.full((512,), 2.0, dtype=torch.float64))


def check_expert_parallel_misuse_is_named(rank, world):
    """Ranks that built different layers: a ValueError on every rank at the first call,
    where the exchanges ran with mismatched sizes (a gloo abort). And
    ddp_ignore_expert_parameters on a model already in DDP is refused: DDP had fixed
    its buckets and went on averaging the experts over ranks holding others."""
    from dsv3.distributed import ddp_ignore_expert_parameters
    config = dsv3.MoEConfig(dim=16 + 8 * rank, ffn_dim=24, n_experts=4, top_k=2)
    layer = dsv3.MoE(config, ep_group=dist.group.WORLD)
    try:
        layer(torch.randn(6, config.dim))
    except ValueError as error:
        assert "disagree on (dim, n_experts, dtype): [(16, 4, 'torch.float32'), (24, 4, " \
               "'torch.float32')]" in str(error), error
    else:
        raise AssertionError("ranks with different layers were not detected")
    config = dsv3.MoEConfig(dim=16, ffn_dim=24, n_experts=4, top_k=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), dsv3.MoE(config, ep_group=dist.group.WORLD))
    try:
        ddp_ignore_expert_parameters(DDP(model))
    except ValueError as error:
        assert "model is already wrapped in DistributedDataParallel" in str(error), error
    else:
        raise AssertionError("a model already in DDP was accepted")


def check_compression_settings_on_resume(rank, world, out_dir):
    """The trainer logs its compression figures per logging window (they were the
    whole run's, the warm-up included), and a resumed run takes the config's
    compress_start_iter (the checkpoint's overrode it, though the CLI reported the
    change as applied)."""
    from dsv3.train.config import StageConfig
    from dsv3.train.trainer import Trainer
    from train_support import synthetic_data, three_stage_config
    data = synthetic_data()

    def config(start_iter):
        return three_stage_config(out_dir, steps=9, log_every=3, compress_grads=True,
                                  compress_start_iter=start_iter,
                                  stages=[StageConfig("base", "lm", 1.0, seq_len=24)])
    trainer = Trainer(config(3), data)
    logged = []
    trainer.logger.log = lambda step, metrics: logged.append(metrics["comm_ratio"])
    for step in range(1, 7):  # as train() does, stopped after step 6
        record = trainer.train_step(measure=step % 3 == 0)
        if step % 3 == 0:
            trainer._log(record)
    # steps 1-3 uncompressed (fp32: ratio 1); steps 4-6 int8 (about a quarter)
    assert len(logged) == 2 and logged[0] == 1.0 and 0 < logged[1] < 0.3, logged
    trainer.save()
    resumed = Trainer(config(8), data)
    resumed.load_state_dict(resumed._load_agreed_state())
    assert resumed.compression.start_iter == 8 and resumed.compression.iteration == 6
    assert not resumed.compression.compressing
