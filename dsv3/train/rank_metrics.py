"""Metrics of the whole data-parallel batch, not of rank 0's share of it.

Under DDP every rank computes its own loss and routes its own tokens, while rank 0
alone logs and writes the report. Left as they were, the curves and expert loads
would be those of 1/W of the batch: noisier, and blind to an imbalance that only
the other ranks' tokens show. The ranks' figures are combined with one collective
on logged steps (and once for the report), so the other steps stay free of it."""
import torch
import torch.distributed as dist

from dsv3.moe import MoEStats


def _averaged_keys(record: dict) -> list[str]:
    """The record's per-rank losses: the LM loss and DPO's loss, margin and accuracy."""
    return [key for key in record if key == "loss" or key.startswith("dpo/")]


def reduce_logged_step(record: dict, moe_stats: list[MoEStats], world: int,
                       device: torch.device) -> list[MoEStats]:
    """Averages ``record``'s losses over the ranks (in place) and returns ``moe_stats``
    (per MoE layer) for the whole batch: expert loads and dropped copies summed,
    balance losses and router entropy averaged. Every rank calls it, on the same
    steps (the logged ones)."""
    keys = _averaged_keys(record)
    parts = [torch.as_tensor(record[key], dtype=torch.float64, device=device).reshape(1)
             for key in keys]
    for stats in moe_stats:
        parts.append(stats.tokens_per_expert.to(device, torch.float64))
        parts.append(stats.dropped_tokens.to(device, torch.float64).reshape(1))
        means = [stats.aux_loss, stats.z_loss]
        if stats.router_entropy is not None:  # set on every rank alike (logged steps)
            means.append(stats.router_entropy)
        parts.append(torch.stack([m.to(device, torch.float64) for m in means]))
    if not parts:  # no losses logged, no MoE layers: nothing to combine
        return moe_stats
    flat = torch.cat(parts)
    dist.all_reduce(flat)  # float64: counts stay exact up to 2**53
    pieces = iter(flat.split([p.numel() for p in parts]))
    for key in keys:
        value = next(pieces)[0] / world
        record[key] = value.to(record[key].dtype) if isinstance(record[key], torch.Tensor) \
            else value.item()
    combined = []
    for stats in moe_stats:
        counts_E, dropped, means = next(pieces), next(pieces)[0], next(pieces) / world
        entropy = means[2].to(stats.router_entropy.dtype) if stats.router_entropy is not None \
            else None
        combined.append(MoEStats(counts_E.to(stats.tokens_per_expert.dtype),
                                 dropped.to(stats.dropped_tokens.dtype),
                                 means[0].to(stats.aux_loss.dtype),
                                 means[1].to(stats.z_loss.dtype), entropy))
    return combined


def summed_over_ranks(load_counts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each MoE layer's expert loads summed over the ranks (every rank calls it)."""
    if not load_counts:
        return []
    flat = torch.cat([counts.to(torch.float64) for counts in load_counts])
    dist.all_reduce(flat)
    return [summed.to(counts.dtype)
            for summed, counts in zip(flat.split([c.numel() for c in load_counts]), load_counts)]
