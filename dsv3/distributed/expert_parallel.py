"""Expert parallelism: the experts of an MoE layer sharded over a process group,
tokens moved to their experts' rank and back with ``all_to_all_single``.

Rank r of W holds experts [r E/W, (r+1) E/W). Every rank routes its own tokens,
groups the copies by expert (so the copies bound for each rank are contiguous),
exchanges per-expert counts, then the rows (variable splits). A received batch
is ordered (source rank, expert, token); regrouping it by expert gives each local
expert exactly the rows, in the same order, that a single process running the
layer on all ranks' tokens concatenated would give it, so the outputs and the
expert gradients are bit-for-bit those of the single-process layer. Dropless.

The counts must be known on the host to size the exchange: one device sync per
layer call, inherent to variable-split all-to-all.

Under DDP the expert weights are not DDP's to average (each rank holds others):
``ddp_ignore_expert_parameters`` takes them out of DDP and averages their gradients
itself, over the replicas of each shard too.
"""
import torch
import torch.distributed as dist
from torch.utils.weak import WeakIdKeyDictionary

from dsv3 import ops
from dsv3.ops.permute import unpermute_from_expert_index


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows with variable splits; its gradient is the same
    exchange with the splits swapped. (torch.distributed.nn's version is deprecated
    in favour of a private module.)"""

    @staticmethod
    def forward(ctx, x_RD, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out_RD = x_RD.new_empty(sum(out_splits), *x_RD.shape[1:])
        dist.all_to_all_single(out_RD, x_RD.contiguous(), out_splits, in_splits, group=group)
        return out_RD

    @staticmethod
    def backward(ctx, grad_out_RD):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad_out_RD, in_splits, out_splits, ctx.group), None, None, None


def all_to_all_rows(x_RD, out_splits, in_splits, group):
    """Rows of ``x_RD`` in ``in_splits`` blocks to each rank; ``out_splits`` rows from each."""
    return _AllToAll.apply(x_RD, out_splits, in_splits, group)


def local_expert_range(n_experts: int, group) -> range:
    """The experts rank ``group.rank()`` holds; checks that they divide evenly."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if n_experts % world:
        raise ValueError(f"expert parallelism: n_experts={n_experts} must be divisible by the "
                         f"expert-parallel group size {world}")
    per_rank = n_experts // world
    return range(rank * per_rank, (rank + 1) * per_rank)


# dtype codes for check_ranks_agree (floating inputs only reach the layer)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_ranks_agree(x_TD: torch.Tensor, n_experts: int, group) -> None:
    """A ValueError on every rank if the ranks of ``group`` disagree on the layer's
    input width, expert count or dtype: the exchanges would run with mismatched sizes,
    which gloo ends with an abort and NCCL may not notice. One small all_gather (and a
    host read): the layer makes it on its first call only."""
    code = _DTYPES.index(x_TD.dtype) if x_TD.dtype in _DTYPES else -1
    mine = torch.tensor([x_TD.shape[-1], n_experts, code], dtype=torch.int64,
                        device=x_TD.device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    ranks = [tuple(t.tolist()) for t in gathered]
    if any(r != ranks[0] for r in ranks):
        described = [(dim, experts, str(_DTYPES[c]) if c >= 0 else "other")
                     for dim, experts, c in ranks]
        raise ValueError(f"expert parallelism: the ranks of ep_group disagree on (dim, "
                         f"n_experts, dtype): {described} (rank order); every rank must "
                         f"build the same layer and feed it the same dtype")


def expert_parallel_ffn(x_TD: torch.Tensor, experts_TK: torch.Tensor, weights_TK: torch.Tensor,
                        gate_up_local_E2FD: torch.Tensor, down_local_EDF: torch.Tensor,
                        n_experts: int, group, swiglu_limit: float | None = None) -> torch.Tensor:
    """y_TD = sum_k weights_TK[t, k] * expert_{experts_TK[t, k]}(x_TD[t]) with the
    experts spread over ``group``; differentiable w.r.t. x_TD, weights_TK and the
    local expert weights (the all-to-alls carry the gradients back). ``swiglu_limit``
    clamps the experts' SwiGLU (ops.swiglu's ``limit``). T may be 0 (an uneven last
    batch): the rank still serves the others' tokens in both exchanges."""
    world = dist.get_world_size(group)
    n_local = n_experts // world
    empty = x_TD.shape[0] == 0
    if empty:  # the ops want at least one token; there is nothing to group
        x_SD, counts_E = x_TD, torch.zeros(n_experts, dtype=torch.int64, device=x_TD.device)
    else:
        x_SD, offsets_E, row_map_TK = ops.permute(x_TD, experts_TK, n_experts)
        counts_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)).to(torch.int64)

    # Counts: send_WE[j, e] copies go to rank j's local expert e; recv_WE[i, e] come from rank i.
    send_WE = counts_E.view(world, n_local)
    recv_WE = torch.empty_like(send_WE)
    dist.all_to_all_single(recv_WE, send_WE, group=group)
    send_splits = send_WE.sum(1).tolist()  # the one host sync
    recv_splits = recv_WE.sum(1).tolist()

    recv_RD = all_to_all_rows(x_SD, recv_splits, send_splits, group)
    if recv_RD.shape[0] == 0:  # no copies for this rank's experts in this batch
        # Still a node of the graph through the local weights, so they get (zero)
        # gradients like on every other rank and DDP sees every parameter used.
        y_RD = recv_RD + _dead(gate_up_local_E2FD, down_local_EDF).to(recv_RD.dtype)
    else:
        # Regroup by local expert; within an expert: source rank, then token.
        local_expert_R = torch.arange(n_local, device=x_TD.device).repeat(world).repeat_interleave(
            recv_WE.flatten())
        x_local_RD, offsets_local_E, row_map_R1 = ops.permute(
            recv_RD, local_expert_R.to(torch.int32)[:, None], n_local)
        h_R2F = ops.grouped_mm(x_local_RD, gate_up_local_E2FD.transpose(1, 2), offsets_local_E)
        y_local_RD = ops.grouped_mm(ops.swiglu(h_R2F, swiglu_limit), down_local_EDF.transpose(1, 2),
                                    offsets_local_E)
        y_RD = unpermute_from_expert_index(y_local_RD, row_map_R1)
    y_SD = all_to_all_rows(y_RD, send_splits, recv_splits, group)
    if empty:
        # [0, D], through the exchange back (its backward carries the other ranks'
        # gradients to the local experts) and the routing weights (the router's).
        return y_SD + _dead(weights_TK).to(y_SD.dtype)
    return unpermute_from_expert_index(y_SD, row_map_TK, weights_TK)


def _dead(*tensors: torch.Tensor) -> torch.Tensor:
    """A zero that depends on ``tensors``: it puts them in the graph at no cost."""
    return sum(t.sum() for t in tensors) * 0


def ddp_ignore_expert_parameters(model: torch.nn.Module) -> list[str]:
    """Tell DistributedDataParallel not to all-reduce the expert weights of the
    expert-parallel MoE layers in ``model``, and reduce them here instead. Call it on
    every rank (it may create process groups), before wrapping ``model`` in DDP over
    the default (world) group; returns the ignored names (added to any already
    ignored). The replicated router and shared experts are reduced by DDP as usual.

    DDP cannot average the expert weights: each rank of an ``ep_group`` holds other
    experts. Their gradients are already summed over the ep_group's tokens (the
    backward all-to-all brings every rank's), so a hook on each expert weight sums
    them over the replicas of its shard (the ranks of the other ep_groups holding
    the same experts, when the ep_groups are smaller than the world) and divides by
    the world size: the gradients are those of the same model without expert
    parallelism under DDP, the mean over all ranks' batches. The hook acts on each
    incoming gradient, before it is accumulated into ``.grad``, so gradient
    accumulation stays right; the replica sum is then one collective per expert
    weight per backward, under ``model.no_sync()`` too. Calling this again replaces
    the hooks (no double scaling)."""
    from torch.nn.parallel import DistributedDataParallel
    from dsv3.moe import MoE

    wrapped = [name or "model" for name, module in model.named_modules()
               if isinstance(module, DistributedDataParallel)]
    if wrapped:  # DDP fixed the parameters it reduces when it was built
        raise ValueError(f"ddp_ignore_expert_parameters: {wrapped[0]} is already wrapped in "
                         f"DistributedDataParallel, which would still average the expert "
                         f"weights over ranks that hold other experts; call it on the model "
                         f"before wrapping it")
    layers = [(name, module) for name, module in model.named_modules()
              if isinstance(module, MoE) and module.ep_group is not None]
    replica_groups = {}  # per ep_group, made in the same order on every rank
    names = []
    for module_name, module in layers:
        if module.ep_group not in replica_groups:
            replica_groups[module.ep_group] = _replica_group(module.ep_group)
        for param_name in ("gate_up_proj", "down_proj"):
            names.append(f"{module_name}.{param_name}" if module_name else param_name)
            _hook_expert_grad(getattr(module, param_name), replica_groups[module.ep_group])
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    ignored += [name for name in names if name not in ignored]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return names


# Expert weight -> its gradient hook's handle: a second registration replaces the first.
# Kept here, not on the parameter, so copies and pickles of the model carry no handle.
_expert_grad_hooks = WeakIdKeyDictionary()  # by identity: tensors compare elementwise


def _hook_expert_grad(param: torch.Tensor, replica_group) -> None:
    world = dist.get_world_size()

    def average(grad: torch.Tensor) -> torch.Tensor:
        grad = grad / world  # a new tensor: a hook must not change its argument
        if replica_group is not None:
            # In the backward's order of the expert weights: the same on every replica,
            # which runs the same model (an idle shard's weights enter the graph where
            # a busy one's do, see expert_parallel_ffn).
            dist.all_reduce(grad, group=replica_group)
        return grad

    if param in _expert_grad_hooks:
        _expert_grad_hooks[param].remove()
    _expert_grad_hooks[param] = param.register_hook(average)


def _replica_group(ep_group):
    """The ranks that hold the same expert shard as this one (the same rank within
    their own ep_group), or None when the ep_group is the whole world (no replicas).
    Every rank makes every replica group, in the same order, as
    torch.distributed.new_group requires."""
    world, ep_world = dist.get_world_size(), dist.get_world_size(ep_group)
    layout = [None] * world  # (rank in its ep_group, that group's size) per rank
    dist.all_gather_object(layout, (dist.get_rank(ep_group), ep_world))
    if any(size != ep_world for _, size in layout) or world % ep_world:
        raise ValueError(f"ddp_ignore_expert_parameters: the ep_groups must all have one size "
                         f"that divides the world size {world}, got sizes "
                         f"{[size for _, size in layout]} (rank order)")
    if ep_world == world:
        return None
    mine = None
    for shard in range(ep_world):
        members = [rank for rank, (ep_rank, _) in enumerate(layout) if ep_rank == shard]
        if len(members) != world // ep_world:  # overlapping ep_groups
            raise ValueError(f"ddp_ignore_expert_parameters: the ep_groups must partition the "
                             f"world: rank {shard} of an ep_group is held by ranks {members}, "
                             f"expected {world // ep_world} of them")
        group = dist.new_group(members)
        if shard == dist.get_rank(ep_group):
            mine = group
    return mine
