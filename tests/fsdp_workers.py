"""Per-rank body of the FSDP2 test (tests/test_fsdp.py runs it through
tests/rank_runner.run_ranks in spawned processes). Each rank rebuilds every rank's
batches from seeds, so it checks the sharded model against a single-process copy
trained on all of them."""
import copy

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import dsv3
from dsv3.model import ModelConfig, Transformer
from dsv3.moe import MoEConfig


def _batch(step: int, rank: int) -> torch.Tensor:
    return torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(100 * step + rank))


def _loss(model, tokens_BS) -> torch.Tensor:
    logits = model(tokens_BS[:, :-1]).float()
    lm = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens_BS[:, 1:].flatten())
    return lm + dsv3.moe_aux_loss(model)


def check_fsdp2_matches_one_process(rank, world):
    """dsv3's Transformer with each decoder block sharded by FSDP2 (fully_shard) trains
    as one process does on every rank's batch: the same gradients (FSDP averages them),
    parameters after AdamW steps, and expert-selection biases, equal on every rank,
    once moe_update_bias gets the data-parallel group."""
    torch.manual_seed(0)
    moe = MoEConfig(dim=32, ffn_dim=48, n_experts=4, top_k=2, score="sigmoid",
                    bias_update_rate=1e-2, aux_loss_coef=0.01)
    config = ModelConfig(vocab_size=97, dim=32, n_layers=3, n_heads=4, n_kv_heads=2,
                         max_seq_len=64, n_dense_layers=1, dense_ffn_dim=64, moe=moe)
    model = Transformer(config)
    one = copy.deepcopy(model)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    sharded_opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    one_opt = torch.optim.AdamW(one.parameters(), lr=1e-2)
    for step in range(3):
        _loss(model, _batch(step, rank)).backward()
        # every rank's batch, weighted as FSDP's gradient average weighs them
        (sum(_loss(one, _batch(step, r)) for r in range(world)) / world).backward()
        for (name, p), q in zip(model.named_parameters(), one.parameters()):
            assert torch.allclose(p.grad.full_tensor(), q.grad, rtol=1e-4, atol=1e-6), \
                f"rank {rank}, step {step}: gradient of {name}"
        sharded_opt.step()
        one_opt.step()
        sharded_opt.zero_grad()
        one_opt.zero_grad()
        before = [layer.expert_bias.clone() for layer in model.moe_layers()]
        dsv3.moe_update_bias(model, dist.group.WORLD)
        dsv3.moe_update_bias(one)  # it routed every rank's tokens: the same counts
        for layer, one_layer, old in zip(model.moe_layers(), one.moe_layers(), before):
            assert torch.equal(layer.expert_bias, one_layer.expert_bias), f"step {step}"
            # it did step (not "is non-zero": a step can bring it back to zero)
            assert not torch.equal(layer.expert_bias, old), f"step {step}"
    for (name, p), q in zip(model.named_parameters(), one.parameters()):
        assert torch.allclose(p.full_tensor(), q, rtol=1e-4, atol=1e-6), f"rank {rank}: {name}"
