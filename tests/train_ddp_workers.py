"""Per-rank bodies of the trainer's DDP tests (tests/test_train_ddp.py runs them
through tests/rank_runner.run_ranks in spawned processes, so they live in an
importable module). Each rank checks its own result; the ranks compare what must
agree with a collective."""
import os
import signal

import pytest
import torch
import torch.distributed as dist

import dsv3.train.trainer as trainer_module
from dsv3.moe import MoEStats
from dsv3.train import checkpoint as ckpt
from dsv3.train.config import StageConfig
from dsv3.train.rank_metrics import reduce_logged_step
from dsv3.train.stop import TrainingStopped
from dsv3.train.trainer import Trainer
from train_support import synthetic_data, three_stage_config

ONE_STAGE = [StageConfig("base", "lm", 1.0, seq_len=24)]


def check_ddp_resume(rank, world, out_dir, stop):
    """Stopped after ``stop`` steps, saved and resumed, every rank continues its own
    run (its data stream, compression residuals): the parameters equal, bit for bit,
    those of the run that never stopped. A resume on another number of processes
    is refused, naming both."""
    data = synthetic_data()

    def config(name):
        return three_stage_config(f"{out_dir}/{name}", steps=6, grad_accum=2, log_every=2,
                                  compress_grads=True, compress_start_iter=1, stages=ONE_STAGE)

    straight = Trainer(config("straight"), data)
    straight_history = straight.train(progress=False)
    first = Trainer(config("resumed"), data)
    for _ in range(stop):
        first.train_step()
    first.save()
    resumed = Trainer(config("resumed"), data)
    resumed_history = resumed.train(progress=False)
    assert resumed.step == 6
    for (name, a), b in zip(straight.model.state_dict().items(),
                            resumed.model.state_dict().values()):
        assert torch.equal(a, b), f"rank {rank}: {name} differs after resuming at step {stop}"
    straight_losses = {r["step"]: r["loss"] for r in straight_history}  # rank 0 logs
    assert all(r["loss"] == straight_losses[r["step"]] for r in resumed_history)
    dist.barrier()  # every rank done with the checkpoint before rank 0 reads it as one process
    if rank == 0:
        try:
            ckpt.load_state(f"{out_dir}/resumed", 0, world=1)
        except ValueError as e:
            assert f"written by {world} process(es), this run has 1" in str(e), e
        else:
            raise AssertionError("a resume on 1 process of a 2-process checkpoint was accepted")


def check_ddp_expert_bias(rank, world, out_dir):
    """The aux-loss-free bias steps from the routing counts of all the ranks (not rank
    0's alone): after each step every rank's bias is the previous one moved by the
    sign of the global counts' imbalance."""
    trainer = Trainer(three_stage_config(out_dir, steps=10, grad_accum=2, stages=ONE_STAGE),
                      synthetic_data())
    layers = trainer.model.moe_layers()
    rate = layers[0].config.bias_update_rate
    for step in range(4):
        before = [layer.expert_bias.clone() for layer in layers]
        trainer.train_step()
        for index, (layer, bias, stats) in enumerate(zip(layers, before, trainer.moe_stats)):
            counts = stats.tokens_per_expert.float().clone()  # this rank's, both micro-batches
            dist.all_reduce(counts)
            expected = bias + rate * torch.sign(counts.mean() - counts)
            assert torch.equal(layer.expert_bias, expected), \
                f"rank {rank}, step {step}, layer {index}: {layer.expert_bias} != {expected}"


def check_ddp_resume_needs_one_out_dir(rank, world, out_dir):
    """Ranks whose out_dir is not shared (each its own directory, as one disk per node
    gives) find different checkpoints: rank 0 the run's state, rank 1 only its own
    file. Every rank refuses to resume, naming what each found, instead of rank 1
    starting afresh beside a resumed rank 0; so does a rank whose own file is missing."""
    data = synthetic_data()
    config = three_stage_config(f"{out_dir}/rank{rank}", steps=4, stages=ONE_STAGE)
    first = Trainer(config, data)
    first.train_step()
    first.save()
    try:
        Trainer(config, data).train(progress=False)
    except ValueError as e:
        message = str(e)
        assert "rank 0: step 1; rank 1: no checkpoint" in message, message
        assert "the same out_dir" in message, message
    else:
        raise AssertionError(f"rank {rank} resumed from an out_dir the other rank lacks")
    shared = three_stage_config(f"{out_dir}/shared", steps=4, stages=ONE_STAGE)
    first = Trainer(shared, data)
    first.train_step()
    first.save()
    dist.barrier()
    if rank == 1:
        ckpt.rank_path(shared.out_dir, 1, 1).unlink()
    dist.barrier()
    try:
        Trainer(shared, data).train(progress=False)
    except ValueError as e:
        assert "rank 0: step 1; rank 1: FileNotFoundError" in str(e), e
    else:
        raise AssertionError(f"rank {rank} resumed with rank 1's own state missing")


def check_ddp_metrics_cover_every_rank(rank, world, out_dir):
    """Logged losses are the ranks' mean and expert loads their sum; the report's heat
    map (at the end of training and rebuilt by `dsv3 report`) counts every rank's
    tokens, not rank 0's alone."""
    stats = [MoEStats(torch.tensor([rank, 1], dtype=torch.int32), torch.tensor(rank),
                      torch.tensor(float(rank)), torch.tensor(2.0), torch.tensor(4.0 * rank))]
    record = {"loss": torch.tensor(rank + 1.0), "dpo/reward_accuracy": 0.5 * rank, "lr": 0.1}
    (combined,) = reduce_logged_step(record, stats, world, torch.device("cpu"))
    assert record == {"loss": torch.tensor(1.5), "dpo/reward_accuracy": 0.25, "lr": 0.1}, record
    assert combined.tokens_per_expert.tolist() == [1, 2]
    assert combined.tokens_per_expert.dtype == torch.int32
    assert combined.dropped_tokens.item() == 1 and combined.aux_loss.item() == 0.5
    assert combined.z_loss.item() == 2.0 and combined.router_entropy.item() == 2.0

    config = three_stage_config(out_dir, steps=2, log_every=1, stages=ONE_STAGE)
    trainer = Trainer(config, synthetic_data())
    reported = []  # the heat map's counts the trainer hands to its report
    trainer_module.write_report = lambda out, counts, **kwargs: reported.append(counts)
    local = []  # each logged step's loss and expert loads on this rank, before combining

    def spy(record, moe_stats, *args):
        local.append(torch.cat([torch.as_tensor([float(record["loss"])]),
                                *[s.tokens_per_expert.double() for s in moe_stats]]))
        return reduce_logged_step(record, moe_stats, *args)
    trainer_module.reduce_logged_step = spy
    history = trainer.train(progress=False)
    assert len(local) == 2  # both steps logged
    every_step = [torch.empty_like(local[0]) for _ in range(world)]
    for step, mine in enumerate(local):
        dist.all_gather(every_step, mine)
        summed = sum(every_step)
        if rank == 0:  # the logged record: the ranks' mean loss, loads of both ranks' tokens
            assert history[step]["loss"] == pytest.approx(summed[0].item() / world, rel=1e-6)
            layer0 = summed[1:1 + trainer.model.moe_layers()[0].config.n_experts]
            assert history[step]["moe/layer0/load_max_over_mean"] == pytest.approx(
                (layer0.max() / layer0.mean()).item(), rel=1e-6)
    own = torch.stack(trainer.load_counts)
    every = [torch.empty_like(own) for _ in range(world)]
    dist.all_gather(every, own)
    assert not torch.equal(every[0], every[1])  # the ranks routed different tokens
    if rank == 0:
        heat = torch.stack(ckpt.run_load_counts(out_dir, ckpt.load_state(out_dir)))
        assert torch.equal(heat, sum(every))
        assert torch.equal(torch.stack(reported[0]), heat)
        copies = 2 * config.micro_batch * 24 * 2 * world  # steps x rows x seq_len x top_k
        assert heat.sum(1).tolist() == [copies] * heat.shape[0]


def check_ddp_stop_on_one_ranks_signal(rank, world, out_dir):
    """A SIGTERM that reaches one rank alone (rank 1, before step 3) stops every rank
    after that same step, with one checkpoint of that step; the resume continues the
    run that never stopped, bit for bit. Before, rank 1 died and rank 0 waited in the
    next all-reduce."""
    data = synthetic_data()

    def config(name):
        return three_stage_config(f"{out_dir}/{name}", steps=6, log_every=2, stages=ONE_STAGE)

    straight = Trainer(config("straight"), data)
    straight.train(progress=False)
    trainer = Trainer(config("stopped"), data)
    real = trainer.train_step

    def train_step(measure=False):
        if rank == 1 and trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(measure=measure)

    trainer.train_step = train_step
    try:
        trainer.train(progress=False)
    except TrainingStopped as stopped:
        assert (stopped.step, stopped.signal_name) == (3, "SIGTERM"), (rank, stopped)
    else:
        raise AssertionError(f"rank {rank} did not stop")
    assert ckpt.saved_run(f"{out_dir}/stopped")["step"] == 3
    assert ckpt.rank_path(f"{out_dir}/stopped", rank, 3).is_file()
    resumed = Trainer(config("stopped"), data)
    resumed.train(progress=False)
    for (name, a), b in zip(straight.model.state_dict().items(),
                            resumed.model.state_dict().values()):
        assert torch.equal(a, b), f"rank {rank}: {name} differs after the stop and resume"
