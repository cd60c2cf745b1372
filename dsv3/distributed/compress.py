"""Compressed all-reduce: int8 block quantization with error feedback.

int8 values cannot be summed in flight (they would overflow and each rank's
blocks have their own scales), so the reduction is done the way working systems
do it, in two collectives that each move int8 plus one fp32 scale per block:

1. reduce-scatter as an all-to-all: every rank quantizes its whole tensor (with
   its residual from the last call added back: error feedback) and sends chunk j
   to rank j; rank j dequantizes the W chunks it got and sums them in rank
   order, in fp32;
2. all-gather: rank j requantizes its summed chunk (with a second residual of
   its own) and every rank gathers and dequantizes all chunks.

Per rank that sends 2 (W-1) chunks of (1 + 4 / block_size) bytes per value,
against 2 (W-1) / W * 4 bytes per value for an fp32 ring all-reduce: 25.4% at
block_size 256. Each residual is what quantization dropped; adding it to the
next call's input makes the error of the sum over steps stay bounded instead of
growing (error feedback, as in 1-bit SGD / EF-SGD).
"""
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dsv3 import ops
from dsv3.kernels import device_checks


@dataclass
class CompressionStats:
    """What the last compressed call did, summed over its tensors since ``reset``.
    Norms are tensors (reading them syncs the device: the caller chooses when)."""
    calls: int = 0
    bytes_sent: int = 0  # by this rank, counted from the collectives' buffers
    bytes_fp32: int = 0  # what an fp32 ring all-reduce of the same tensors sends per rank
    error_sq: torch.Tensor | None = None  # sum of squared residuals (both phases)
    value_sq: torch.Tensor | None = None  # sum of squared quantized inputs (both phases)

    @property
    def compression_ratio(self) -> float:
        """Bytes sent relative to fp32 all-reduce (0.25 = a quarter)."""
        return self.bytes_sent / self.bytes_fp32 if self.bytes_fp32 else float("nan")

    @property
    def relative_error(self) -> float:
        """||residuals|| / ||quantized values||: the quantization error of the calls."""
        if self.value_sq is None:
            return float("nan")
        return math.sqrt(self.error_sq.item() / max(self.value_sq.item(), 1e-30))

    @property
    def error_feedback_norm(self) -> float:
        """||residuals||: how much quantization error the calls carried forward."""
        return math.sqrt(self.error_sq.item()) if self.error_sq is not None else float("nan")

    def reset(self) -> None:
        self.calls = self.bytes_sent = self.bytes_fp32 = 0
        self.error_sq = self.value_sq = None

    def _add_norms(self, residual_N: torch.Tensor, value_N: torch.Tensor) -> None:
        error_sq, value_sq = residual_N.square().sum(), value_N.square().sum()
        self.error_sq = error_sq if self.error_sq is None else self.error_sq + error_sq
        self.value_sq = value_sq if self.value_sq is None else self.value_sq + value_sq


@dataclass
class CompressionState:
    """Error-feedback residuals and settings, one state per DDP model (or per set of
    tensors reduced together each step): ``step()`` frees the residuals of keys that
    its iteration did not reduce, so two models sharing a state would free each
    other's every step (a warning says so) and lose their error feedback.

    ``start_iter``: steps all-reduced uncompressed first (as PowerSGD's
    ``start_powerSGD_iter``): early gradients are large and fast-changing and DDP
    rebuilds its buckets after the first step. ``step()`` advances the count (the
    DDP hook does it itself) and frees the residuals of keys the iteration did not
    reduce. Save ``state_dict()`` with checkpoints: a resumed run then carries on
    with the same residuals (at the same world size; at another one they are
    dropped, with a warning)."""
    process_group: dist.ProcessGroup | None = None
    block_size: int = 256
    start_iter: int = 10
    iteration: int = 0
    residuals: dict = field(default_factory=dict)  # key -> (input residual, chunk residual)
    stats: CompressionStats = field(default_factory=CompressionStats)
    # Keys reduced compressed since the last step(), and loaded keys spared by the next one.
    _used_keys: set = field(default_factory=set, init=False, repr=False)
    _spared_keys: set = field(default_factory=set, init=False, repr=False)
    _freed_last_step: bool = field(default=False, init=False, repr=False)
    _warned_alternating: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) \
                or not 1 <= self.block_size <= 4096:
            raise ValueError(f"CompressionState: block_size must be an int in [1, 4096], "
                             f"got {self.block_size!r}")
        if isinstance(self.start_iter, bool) or not isinstance(self.start_iter, int) \
                or self.start_iter < 0:
            raise ValueError(f"CompressionState: start_iter must be an int >= 0, "
                             f"got {self.start_iter!r}")
        check_group("CompressionState: process_group", self.process_group)

    @property
    def compressing(self) -> bool:
        return self.iteration >= self.start_iter

    def step(self) -> None:
        """Ends an iteration. A residual whose key this iteration did not reduce belongs
        to a tensor that is gone (DDP's initial one-bucket layout, after DDP rebuilt its
        buckets): kept, it would be memory and checkpoint bytes forever, and a restart
        would add one more. Loaded residuals are spared once: after a restart DDP's
        first iteration runs the initial layout again, and the saved buckets return in
        the second."""
        kept = {key: value for key, value in self.residuals.items()
                if key in self._used_keys or key in self._spared_keys}
        # Residuals freed two steps running: not one bucket rebuild (which frees once)
        # but keys reduced on alternate steps, as by two models sharing this state.
        freeing = len(kept) < len(self.residuals)
        if freeing and self._freed_last_step and not self._warned_alternating:
            self._warned_alternating = True
            warnings.warn("CompressionState: residuals of keys reduced in the last "
                          "iteration were freed again: is this state shared by two models "
                          "(or are tensors reduced on alternate steps)? Each DDP model "
                          "needs a CompressionState of its own, or its error feedback is "
                          "lost.", stacklevel=2)
        self._freed_last_step = freeing
        self.residuals = kept
        self._used_keys, self._spared_keys = set(), set()
        self.iteration += 1

    def state_dict(self) -> dict:
        return {"block_size": self.block_size, "start_iter": self.start_iter,
                "iteration": self.iteration, "world_size": self._world_size(),
                "residuals": {key: (first.cpu(), second.cpu())
                              for key, (first, second) in self.residuals.items()}}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        """Restores a ``state_dict()``; the residuals go to ``device`` (by default they
        stay on the CPU and move to each tensor's device on its first reduction)."""
        needed = ("block_size", "start_iter", "iteration", "residuals")
        if not isinstance(state, dict) or any(key not in state for key in needed):
            have = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"CompressionState.load_state_dict: expected a dict from "
                             f"CompressionState.state_dict() with keys {list(needed)}, got "
                             f"{have}")
        if state["block_size"] != self.block_size:
            raise ValueError(f"CompressionState.load_state_dict: block_size {state['block_size']} "
                             f"in the checkpoint, {self.block_size} here")
        self.start_iter, self.iteration = state["start_iter"], state["iteration"]
        saved_world, world = state.get("world_size"), self._world_size()
        if state["residuals"] and None not in (saved_world, world) and saved_world != world:
            # Each residual belongs to one rank's share of a world-size split: at another
            # world size it is another rank's error, on other positions.
            warnings.warn(f"CompressionState.load_state_dict: the residuals were saved at world "
                          f"size {saved_world}, this run has {world}: starting them afresh",
                          stacklevel=2)
            self.residuals = {}
        else:
            self.residuals = {key: (first.to(device), second.to(device))
                              for key, (first, second) in state["residuals"].items()}
        self._used_keys, self._spared_keys = set(), set(self.residuals)

    def _world_size(self) -> int | None:
        return dist.get_world_size(self.process_group) if dist.is_initialized() else None


def _check_ranks_agree(numel: int, state: CompressionState, group, device) -> None:
    """A tensor of another size on some rank, or a rank that compresses while another
    does not (its iteration restored from another step's checkpoint), would make the
    collectives below hang or corrupt memory: compare first (one tiny collective).
    On the CPU the error says each rank's values. On a GPU the comparison stays on the
    device (a device-side assert, as the kernels' input checks): a host sync here (a
    read of the result, or a blocking copy of the values in) would stall the backward
    at every DDP bucket until all communication before it had finished. Every rank
    gathers the same values, so all of them stop, before the mismatched collectives
    run."""
    # To a GPU from pinned memory: an asynchronous copy (on the CPU .to() is a no-op).
    mine = torch.tensor([numel, int(state.compressing), state.iteration, state.start_iter,
                         state.block_size],
                        dtype=torch.int64, pin_memory=torch.device(device).type == "cuda"
                        ).to(device, non_blocking=True)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    _collective(dist.all_gather, gathered, mine, group=group)
    ranks_W5 = torch.stack(gathered)
    if ranks_W5.device.type != "cpu":
        agree = ((ranks_W5[:, 0] == numel).all() & (ranks_W5[:, 1] == ranks_W5[0, 1]).all()
                 & (ranks_W5[:, 4] == state.block_size).all())
        device_checks.raise_unless(agree, "compressed_all_reduce: the ranks disagree on the "
                                   "tensor's number of elements, on compressing "
                                   "(state.iteration, state.start_iter) or on state.block_size")
        return
    numels, compressing, iterations, start_iters, block_sizes = zip(*ranks_W5.tolist())
    if any(n != numel for n in numels):
        raise ValueError(f"compressed_all_reduce: tensor must have the same number of elements "
                         f"on every rank, got {list(numels)} (rank order)")
    if any(size != state.block_size for size in block_sizes):  # the chunks would not line up
        raise ValueError(f"compressed_all_reduce: state.block_size must be the same on every "
                         f"rank, got {list(block_sizes)} (rank order)")
    if len(set(compressing)) > 1:
        raise ValueError(f"compressed_all_reduce: the ranks disagree on compressing: "
                         f"state.iteration {list(iterations)}, state.start_iter "
                         f"{list(start_iters)} (rank order); restore every rank's state from "
                         f"the same step")


def _residual(state: CompressionState, key, numel: int, chunk: int, device) -> tuple:
    residual = state.residuals.get(key)
    if residual is None or residual[0].numel() != numel or residual[1].numel() != chunk:
        # A new or resized tensor (DDP rebuilds its buckets once), or another world size
        # (the same numel splits into other chunks): start clean.
        return torch.zeros(numel, device=device), torch.zeros(chunk, device=device)
    # Loaded onto the CPU, used on the GPU: the residuals follow the tensor.
    return residual[0].to(device), residual[1].to(device)


def check_group(name: str, group) -> None:
    """None (the world) or a process group: anything else fails later in torch with
    "'str' object has no attribute 'size'", which names neither."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup or None, "
                        f"got {type(group).__name__}")


def compressed_all_reduce(tensor: torch.Tensor, state: CompressionState, group=None, *,
                          average: bool = False, key="default") -> torch.Tensor:
    """All-reduce (sum, or mean with ``average``) ``tensor`` in place across ``group``
    (default: the state's group, else the world) through int8 blocks with error
    feedback; returns it. ``key`` names the tensor's residuals in ``state``: use a
    distinct key per tensor that is reduced every step. Uncompressed (plain
    all_reduce) while ``state.iteration < state.start_iter``."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise TypeError(f"compressed_all_reduce: tensor must be a floating-point torch.Tensor, "
                        f"got {getattr(tensor, 'dtype', type(tensor).__name__)}")
    if not isinstance(state, CompressionState):
        raise TypeError(f"compressed_all_reduce: state must be a CompressionState, "
                        f"got {type(state).__name__}")
    if not dist.is_initialized():
        raise RuntimeError("compressed_all_reduce: torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group first)")
    if tensor.requires_grad:
        raise TypeError("compressed_all_reduce: tensor must not require grad (it is reduced in "
                        "place): pass a gradient, e.g. param.grad, not the parameter")
    check_group("compressed_all_reduce: group", group)
    group = group if group is not None else state.process_group
    return _compressed_all_reduce(tensor, state, group, average, key)


def _collective(fn, *args, **kwargs):
    """Runs one torch.distributed collective; a failure is said in this function's terms.
    Only the collectives: a local error (out of memory, a bad input) keeps its own message."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistError) as error:
        # gloo/NCCL say "connection closed" or "timed out"; say what it means here.
        raise RuntimeError(f"compressed_all_reduce: a collective failed (a rank may have died, "
                           f"or missed this call and timed out): {error}") from error


def _compressed_all_reduce(tensor, state, group, average, key):
    world = dist.get_world_size(group)
    _check_ranks_agree(tensor.numel(), state, group, tensor.device)
    if tensor.numel() == 0:  # every rank agrees there is nothing to send
        return tensor
    state.stats.calls += 1
    state.stats.bytes_fp32 += 2 * (world - 1) * tensor.numel() * 4 // world
    if not state.compressing or world == 1:
        # A dense buffer, fp32 or fp64 (a plain all_reduce rounds nothing): .float() of
        # an fp32 tensor is the tensor itself, and a strided view (x[::2]) would be
        # reduced over the wrong memory, its base's too.
        wide = tensor if tensor.dtype == torch.float64 else tensor.float()
        reduced = wide.contiguous()
        _collective(dist.all_reduce, reduced, group=group)
        state.stats.bytes_sent += 2 * (world - 1) * tensor.numel() * reduced.element_size() // world
        tensor.copy_(reduced / world if average else reduced)
        return tensor

    block = state.block_size
    chunk = math.ceil(tensor.numel() / (world * block)) * block  # whole blocks per rank
    flat_N = torch.zeros(world * chunk, device=tensor.device, dtype=torch.float32)
    flat_N[:tensor.numel()] = tensor.flatten()
    input_residual_N, chunk_residual_C = _residual(state, key, flat_N.numel(), chunk, tensor.device)

    # 1. Reduce-scatter as all-to-all of quantized chunks; dequantize + sum in fp32.
    q_N, scales_B, input_residual_N = ops.quantize_int8(flat_N, block, input_residual_N)
    state.stats._add_norms(input_residual_N, flat_N)
    q_recv_WC = torch.empty(world, chunk, dtype=torch.int8, device=tensor.device)
    scales_recv_WB = torch.empty(world, chunk // block, device=tensor.device)
    _collective(dist.all_to_all_single, q_recv_WC, q_N.view(world, chunk), group=group)
    _collective(dist.all_to_all_single, scales_recv_WB, scales_B.view(world, chunk // block),
                group=group)
    sum_C = ops.dequantize_int8(q_recv_WC, scales_recv_WB, block)
    if average:
        sum_C /= world

    # 2. Requantize the summed chunk (its own error feedback) and all-gather.
    q_C, scales_b, chunk_residual_C = ops.quantize_int8(sum_C, block, chunk_residual_C)
    state.stats._add_norms(chunk_residual_C, sum_C)
    q_all = [torch.empty_like(q_C) for _ in range(world)]
    scales_all = [torch.empty_like(scales_b) for _ in range(world)]
    _collective(dist.all_gather, q_all, q_C, group=group)
    _collective(dist.all_gather, scales_all, scales_b, group=group)
    state.residuals[key] = (input_residual_N, chunk_residual_C)
    state._used_keys.add(key)

    sent_per_collective = (world - 1) * (chunk + (chunk // block) * 4)
    state.stats.bytes_sent += 2 * sent_per_collective
    reduced_N = ops.dequantize_int8(torch.cat(q_all), torch.cat(scales_all), block)
    tensor.copy_(reduced_N[:tensor.numel()].view_as(tensor))
    return tensor
