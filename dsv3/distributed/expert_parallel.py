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
"""
import torch
import torch.distributed as dist

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


def expert_parallel_ffn(x_TD: torch.Tensor, experts_TK: torch.Tensor, weights_TK: torch.Tensor,
                        gate_up_local_E2FD: torch.Tensor, down_local_EDF: torch.Tensor,
                        n_experts: int, group, swiglu_limit: float | None = None) -> torch.Tensor:
    """y_TD = sum_k weights_TK[t, k] * expert_{experts_TK[t, k]}(x_TD[t]) with the
    experts spread over ``group``; differentiable w.r.t. x_TD, weights_TK and the
    local expert weights (the all-to-alls carry the gradients back). ``swiglu_limit``
    clamps the experts' SwiGLU (ops.swiglu's ``limit``)."""
    world = dist.get_world_size(group)
    n_local = n_experts // world
    x_SD, offsets_E, row_map_TK = ops.permute(x_TD, experts_TK, n_experts)

    # Counts: send_WE[j, e] copies go to rank j's local expert e; recv_WE[i, e] come from rank i.
    counts_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)).to(torch.int64)
    send_WE = counts_E.view(world, n_local)
    recv_WE = torch.empty_like(send_WE)
    dist.all_to_all_single(recv_WE, send_WE, group=group)
    send_splits = send_WE.sum(1).tolist()  # the one host sync
    recv_splits = recv_WE.sum(1).tolist()

    recv_RD = all_to_all_rows(x_SD, recv_splits, send_splits, group)
    if recv_RD.shape[0] == 0:  # no copies for this rank's experts in this batch
        # Still a node of the graph through the local weights, so they get (zero)
        # gradients like on every other rank and DDP sees every parameter used.
        dead = (gate_up_local_E2FD.sum() + down_local_EDF.sum()) * 0
        y_RD = recv_RD + dead.to(recv_RD.dtype)
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
    return unpermute_from_expert_index(y_SD, row_map_TK, weights_TK)


def ddp_ignore_expert_parameters(model: torch.nn.Module) -> list[str]:
    """Tell DistributedDataParallel not to all-reduce the expert weights of the
    expert-parallel MoE layers in ``model``: each rank holds different experts, so
    averaging them across data-parallel ranks would mix experts. Call before
    wrapping ``model`` in DDP; returns the ignored names. (The replicated router
    and shared experts are still reduced as usual.)"""
    from torch.nn.parallel import DistributedDataParallel
    from dsv3.moe import MoE

    names = [f"{module_name}.{param_name}" if module_name else param_name
             for module_name, module in model.named_modules()
             if isinstance(module, MoE) and module.ep_group is not None
             for param_name in ("gate_up_proj", "down_proj")]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names
