"""``dsv3.MoE``: a drop-in Mixture-of-Experts feed-forward layer on the dsv3 ops.

route -> grouped GEMM reading the tokens through the routing map (permute fused
in; gate and up fused) -> SwiGLU (clamped by ``swiglu_limit`` if set) -> grouped GEMM
-> weighted unpermute (+ shared experts). The module is thin: the work and the
gradients live in the ops. Expert weights are kept in nn.Linear's [out, in]
layout (``gate_up_proj`` [E, 2F, D], ``down_proj`` [E, D, F]), the layout
transformers uses, so weights move between the two without reshuffling.
"""
import contextlib
import math
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv3 import ops
from dsv3.ops.permute import unpermute_from_expert_index
from dsv3.ops.route import GROUP_SCORES
from dsv3.ops.linear import HalfLinear, router_logits
from dsv3.validate import number, whole_number

ACTIVATIONS = ("swiglu",)
_replaying = threading.local()


@contextlib.contextmanager
def recomputing():
    """Marks forwards run inside as activation-checkpointing replays: the MoE layers
    then leave their balance counts, losses and stats alone (the first forward already
    recorded them)."""
    previous = getattr(_replaying, "active", False)
    _replaying.active = True
    try:
        yield
    finally:
        _replaying.active = previous


def autocast_compute_dtype(device_type: str, weight_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype autocast would run an expert GEMM in on ``device_type`` with weights of
    ``weight_dtype``, or None where it would leave them alone (outside autocast, or an
    fp64 layer: autocast casts floating tensors other than float64). dsv3's custom ops
    get no autocast of their own: their callers cast the operands to it."""
    if torch.is_autocast_enabled(device_type) and weight_dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return None


@dataclass
class MoEConfig:
    dim: int
    ffn_dim: int  # hidden size of each routed expert
    n_experts: int
    top_k: int = 2
    n_shared_experts: int = 0  # always-on experts, fused as one MLP of n_shared_experts * ffn_dim
    score: str = "softmax"  # "softmax" (Mixtral) or "sigmoid" (DeepSeek-V3)
    n_groups: int = 1  # group-limited routing (DeepSeek-V3: 8 groups, 4 chosen)
    topk_groups: int = 1
    route_scale: float = 1.0  # multiplies the routing weights (DeepSeek-V3: 2.5)
    normalize_weights: bool = True  # weights of the chosen experts sum to route_scale
    aux_loss_coef: float = 0.01  # Switch-Transformer load-balance loss
    z_loss_coef: float = 0.0  # ST-MoE router z-loss
    bias_update_rate: float = 0.0  # DeepSeek-V3 aux-loss-free balancing; 0 disables the bias
    capacity_factor: float | None = None  # None: dropless; else copies past capacity are dropped
    activation: str = "swiglu"
    # GLM-5-Next's and DeepSeek-V4's clamped SwiGLU: gate.clamp(max=L), up.clamp(-L, L)
    # before silu(gate) * up, in the routed and the shared experts alike (both models
    # clamp both); None: no clamp.
    swiglu_limit: float | None = None
    # What makes a group best (ops.route's group_score): "top2_sum", the sum of its two
    # best selection scores (DeepSeek-V3), or "max", its best one (DeepSeek-V2's
    # group_limited_greedy). Only read with n_groups > 1.
    group_score: str = "top2_sum"

    def __post_init__(self):
        for name in ("dim", "ffn_dim", "n_experts", "top_k", "n_groups", "topk_groups"):
            whole_number(f"MoEConfig: {name}", getattr(self, name), 1)
        whole_number("MoEConfig: n_shared_experts", self.n_shared_experts, 0)
        if self.score not in ops.SCORES:
            raise ValueError(f"MoEConfig: score must be one of {ops.SCORES}, got {self.score!r}")
        if self.n_experts % self.n_groups:
            raise ValueError(f"MoEConfig: n_groups={self.n_groups} must divide "
                             f"n_experts={self.n_experts}")
        if self.topk_groups > self.n_groups:
            raise ValueError(f"MoEConfig: topk_groups={self.topk_groups} must be <= "
                             f"n_groups={self.n_groups}")
        if not isinstance(self.group_score, str):
            raise TypeError(f"MoEConfig: group_score must be a str, one of {GROUP_SCORES}, "
                            f"got {type(self.group_score).__name__} {self.group_score!r}")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"MoEConfig: group_score must be one of {GROUP_SCORES}, "
                             f"got {self.group_score!r}")
        reachable = self.topk_groups * (self.n_experts // self.n_groups)
        if self.top_k > reachable:
            raise ValueError(f"MoEConfig: top_k={self.top_k} must be <= the experts reachable in "
                             f"topk_groups groups ({reachable})")
        if not isinstance(self.normalize_weights, bool):
            raise TypeError(f"MoEConfig: normalize_weights must be True or False, got "
                            f"{self.normalize_weights!r}")
        number("MoEConfig: route_scale", self.route_scale, 0, low_open=True)
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            number(f"MoEConfig: {name}", getattr(self, name), 0)
        if self.capacity_factor is not None:  # None: dropless
            number("MoEConfig: capacity_factor", self.capacity_factor, 0, low_open=True)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MoEConfig: activation must be one of {ACTIVATIONS}, "
                             f"got {self.activation!r}")
        if self.swiglu_limit is not None:
            number("MoEConfig: swiglu_limit", self.swiglu_limit, 0, low_open=True)


@dataclass
class MoEStats:
    """What one forward saw, for monitoring. Tensors, detached: reading them is the
    caller's choice of when to sync."""
    tokens_per_expert: torch.Tensor  # int32 [E], copies each expert computed
    dropped_tokens: torch.Tensor  # int64 scalar, copies dropped by the capacity limit
    # Scalars in the router's dtype (fp32; fp64 in a float64 layer), already times their coef:
    aux_loss: torch.Tensor  # load-balance loss
    z_loss: torch.Tensor  # router z-loss
    # Scalar (router's dtype), mean over tokens of the entropy of the normalized router scores;
    # computed only while the layer's ``collect_router_entropy`` is set (an extra pass
    # over the logits), else None.
    router_entropy: torch.Tensor | None = None


def routed_experts(x_TD: torch.Tensor, experts_TK: torch.Tensor, weights_TK: torch.Tensor,
                   gate_up_ED2F: torch.Tensor, down_EFD: torch.Tensor,
                   swiglu_limit: float | None = None) -> torch.Tensor:
    """The dropless expert computation after routing: sum_k weights_TK[t, k] *
    SwiGLU-expert_{experts_TK[t, k]}(x_TD[t]), weights given as [in, out] per expert
    (views of either stored layout); ``swiglu_limit`` clamps the SwiGLU (ops.swiglu's
    ``limit``). The permute is fused into the first GEMM's loads: no expert-ordered copy
    of x is written or kept for the backward."""
    offsets_E, row_map_TK = ops.expert_index(experts_TK, gate_up_ED2F.shape[0])
    h_S2F = ops.gather_grouped_mm(x_TD, gate_up_ED2F, offsets_E, row_map_TK)
    y_SD = ops.grouped_mm(ops.swiglu(h_S2F, swiglu_limit), down_EFD, offsets_E)
    return unpermute_from_expert_index(y_SD, row_map_TK, weights_TK)


class SwiGLUMLP(nn.Module):
    """A dense SwiGLU MLP (the shared experts), gate and up fused in one matmul;
    ``swiglu_limit`` clamps its SwiGLU as the routed experts' (ops.swiglu's ``limit``)."""

    swiglu_limit: float | None = None  # also for instances pickled before it existed

    def __init__(self, dim: int, hidden_dim: int, swiglu_limit: float | None = None, **factory):
        super().__init__()
        self.gate_up_proj = HalfLinear(dim, 2 * hidden_dim, bias=False, **factory)
        self.down_proj = HalfLinear(hidden_dim, dim, bias=False, **factory)
        self.swiglu_limit = swiglu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_T2F = self.gate_up_proj(x).flatten(0, -2)  # the fused op takes rows
        # The width named, not -1: an empty batch (an expert-parallel rank's) has no
        # rows to infer it from.
        y_TD = self.down_proj(ops.swiglu(h_T2F, self.swiglu_limit))
        return y_TD.view(*x.shape[:-1], self.down_proj.out_features)


class MoE(nn.Module):
    """``ep_group``: a torch.distributed group to shard the experts over (expert
    parallelism, dsv3.distributed.expert_parallel): this rank then holds only
    ``expert_range`` in ``gate_up_proj``/``down_proj``; routing stays replicated.
    Dropless only (``capacity_factor=None``)."""

    # Also for instances pickled whole before these existed (forward reads them);
    # expert_range, which depends on the config, is filled in by __setstate__.
    ep_group = None
    collect_router_entropy = False
    input_name = "x"  # forward's argument, as its errors name it

    def __init__(self, config: MoEConfig, *, device=None, dtype=None, ep_group=None):
        super().__init__()
        if not isinstance(config, MoEConfig):  # a dict or None failed on c.n_experts, unnamed
            raise TypeError(f"MoE: config must be a dsv3.MoEConfig, got {type(config).__name__}"
                            + (" (build one with MoEConfig(**config))"
                               if isinstance(config, dict) else ""))
        self.config = c = config
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            # trainable weights: an integer dtype failed deep in nn.Parameter, unnamed
            raise TypeError(f"MoE: dtype must be a floating-point torch.dtype, got {dtype!r}")
        factory = {"device": device, "dtype": dtype}
        self.ep_group = ep_group
        self.expert_range = range(c.n_experts)
        if ep_group is not None:
            # Imported here: the distributed layer sits above the modules, and only
            # an expert-parallel layer needs it.
            from dsv3.distributed.compress import check_group
            from dsv3.distributed.expert_parallel import local_expert_range
            check_group("MoE: ep_group", ep_group)
            if c.capacity_factor is not None:
                raise ValueError("MoE: ep_group needs a dropless config (capacity_factor=None), "
                                 f"got capacity_factor={c.capacity_factor}")
            self.expert_range = local_expert_range(c.n_experts, ep_group)
        n_local = len(self.expert_range)
        self.router = nn.Linear(c.dim, c.n_experts, bias=False, **factory)
        self.gate_up_proj = nn.Parameter(torch.empty(n_local, 2 * c.ffn_dim, c.dim, **factory))
        self.down_proj = nn.Parameter(torch.empty(n_local, c.dim, c.ffn_dim, **factory))
        self.shared_experts = (SwiGLUMLP(c.dim, c.n_shared_experts * c.ffn_dim, c.swiglu_limit,
                                         **factory) if c.n_shared_experts else None)
        if c.bias_update_rate > 0:
            # Selection-only bias, moved by update_bias(), never by gradients.
            self.register_buffer("expert_bias", torch.zeros(c.n_experts, device=device))
            self.register_buffer("pending_counts", torch.zeros(c.n_experts, device=device,
                                                               dtype=torch.int64),
                                 persistent=False)
        else:
            self.expert_bias = None
        self.aux_loss: torch.Tensor | None = None
        self.last_stats: MoEStats | None = None
        self.collect_router_entropy = False  # monitoring: see MoEStats.router_entropy
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) would cast the selection bias too, and its steps
        # (bias_update_rate, 1e-3) vanish below bf16's resolution near 0.5: the bias
        # stays fp32, following the device only, as MoE(..., dtype=...) keeps it.
        bias = self.expert_bias
        module = super()._apply(fn, recurse)
        if bias is not None and self.expert_bias.dtype != torch.float32:
            # Through _buffers, not setattr: a bias that is a (frozen) nn.Parameter object
            # (AFMoE's, Laguna's, shared with the HF block) would become a parameter.
            self._buffers["expert_bias"] = bias.to(self.expert_bias.device)
        return module

    def __getstate__(self):
        # aux_loss is the last training forward's graph output (a non-leaf tensor), which
        # copy.deepcopy refuses: deepcopy(model) mid-training (an EMA or teacher copy)
        # failed. A copy keeps its value, without the graph.
        state = super().__getstate__()
        if state.get("aux_loss") is not None:
            state["aux_loss"] = state["aux_loss"].detach()
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "expert_range" not in self.__dict__:  # pickled before expert parallelism existed
            self.expert_range = range(self.config.n_experts)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # load_state_dict(assign=True) (meta-device init) takes the saved tensor itself,
        # in whatever dtype it was stored: the bias stays fp32 here too (see _apply). The
        # counts are never saved: zeros beside the bias.
        if self.expert_bias is None:
            return
        if self.expert_bias.dtype != torch.float32:
            self.expert_bias = self.expert_bias.float()
        # Always fresh: counted since the last bias update of the run that saved the
        # state, they belong to no step of this one, and after to_empty() they are
        # uninitialized memory.
        if self.pending_counts.device == self.expert_bias.device:
            self.pending_counts.zero_()  # in place: a captured CUDA graph holds this tensor
        else:  # assign=True from the meta device
            self.pending_counts = torch.zeros_like(self.pending_counts,
                                                  device=self.expert_bias.device)

    def reset_parameters(self) -> None:
        """nn.Linear's default init, applied per expert (fan-in of one expert); the
        balancing state back to zero (after ``to_empty()`` it is uninitialized memory)."""
        for weight in (self.gate_up_proj, self.down_proj):
            bound = 1.0 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)
        self.router.reset_parameters()
        if self.expert_bias is not None:
            with torch.no_grad():
                self.expert_bias.zero_()
                self.pending_counts.zero_()

    def check_input(self, x) -> None:
        """Refuses, naming the argument (``input_name``), what forward cannot compute:
        a non-tensor, a last dim other than ``dim``, another device than the layer's,
        the meta device, integer values."""
        c, arg = self.config, f"{type(self).__name__}: {self.input_name}"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != c.dim:
            raise ValueError(f"{arg} must have shape [..., dim={c.dim}], got {tuple(x.shape)}")
        device = self.gate_up_proj.device
        if x.device != device:
            raise ValueError(f"{arg} must be on the layer's device {device}, got {x.device}")
        if x.device.type == "meta":  # which experts a token goes to depends on its values
            raise NotImplementedError(f"{arg} on the meta device: routing needs the values "
                                      f"(materialize the layer, e.g. with to_empty(), first)")
        if not x.is_floating_point():  # autocast in forward would cast token ids silently
            raise TypeError(f"{arg} must be a floating-point tensor, got {x.dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.checked_forward(x)

    def checked_forward(self, x: torch.Tensor) -> torch.Tensor:
        """forward on an ``x`` that check_input has passed: for a subclass that checks
        its input itself, before work of its own."""
        c = self.config
        gate_up, down = self.gate_up_proj, self.down_proj
        device_type = x.device.type
        # Autocast's own rule (an fp64 layer stays fp64, as its shared experts' nn.Linear
        # does under autocast).
        compute_dtype = autocast_compute_dtype(device_type, gate_up.dtype)
        if compute_dtype is not None:
            # Mixed precision: the experts run in the autocast dtype from the fp32 master
            # weights (the casts are differentiable).
            x, gate_up, down = x.to(compute_dtype), gate_up.to(compute_dtype), down.to(compute_dtype)
        elif x.dtype != gate_up.dtype:
            raise TypeError(f"{type(self).__name__}: {self.input_name} must have the layer's "
                            f"dtype {gate_up.dtype}, got {x.dtype}")
        x_TD = x.reshape(-1, c.dim)
        n_tokens = x_TD.shape[0]
        # Router logits in fp32 (in bf16, near-equal scores tie and flip expert choices), in
        # fp64 for an fp64 layer: it runs exactly, gradients and balance losses included.
        router_dtype = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
        logits_TE = self.logits_for(x_TD, router_dtype)
        if n_tokens == 0:
            weights_TK, experts_TK, counts_E, *loss_sums = self._route_nothing(logits_TE)
        else:
            want_losses = self.training and (c.aux_loss_coef > 0 or c.z_loss_coef > 0)
            route = ops.route_with_stats if want_losses else ops.route
            weights_TK, experts_TK, counts_E, *loss_sums = route(
                logits_TE, c.top_k, c.score, self.expert_bias, c.n_groups, c.topk_groups,
                c.normalize_weights, c.route_scale, c.group_score)
        dropped = torch.zeros((), dtype=torch.int64, device=x.device)
        # The balance loss and the bias see what the router chose, before capacity: on
        # the counts left after it, the more lopsided the routing, the weaker the loss
        # (GShard and Switch take the load fraction before the capacity cut too).
        routed_E = counts_E
        if c.capacity_factor is not None:
            weights_TK, experts_TK, counts_E, dropped = self._apply_capacity(
                weights_TK, experts_TK, counts_E, n_tokens)

        if self.ep_group is not None:
            from dsv3.distributed.expert_parallel import check_ranks_agree, expert_parallel_ffn
            if not self.__dict__.get("_ep_ranks_checked", False):
                check_ranks_agree(x_TD, c.n_experts, self.ep_group)
                self._ep_ranks_checked = True
            y_TD = expert_parallel_ffn(x_TD, experts_TK, weights_TK, gate_up, down,
                                       c.n_experts, self.ep_group, c.swiglu_limit)
        elif n_tokens == 0:
            # An empty batch gives an empty output, as nn.Linear and the transformers
            # blocks dsv3 replaces do (the grouped ops want at least one row). Built from
            # the router's weights so that a backward through it still reaches x and the
            # router, with zero gradients; in x's dtype (the weights are fp32). The
            # experts' weights join through empty slices (sums of nothing): they get zero
            # gradients too, so DDP finds every parameter used on a rank whose batch
            # is empty, and the ranks' reductions still match.
            y_TD = weights_TK[:, :1].to(x_TD.dtype) * x_TD
            for weight in (gate_up, down):
                y_TD = y_TD + weight.narrow(0, 0, 0).sum().to(x_TD.dtype)
        else:
            y_TD = routed_experts(x_TD, experts_TK, weights_TK, gate_up.transpose(1, 2),
                                  down.transpose(1, 2), c.swiglu_limit)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)

        self._record(loss_sums, routed_E, counts_E, dropped, n_tokens, logits_TE.dtype)
        if (self.collect_router_entropy and n_tokens > 0
                and not getattr(_replaying, "active", False)):
            self.last_stats.router_entropy = self._router_entropy(logits_TE.detach())
        return y_TD.view(x.shape)

    def logits_for(self, x_TD: torch.Tensor, router_dtype: torch.dtype) -> torch.Tensor:
        """The router's logits [T, E] for ``x_TD``, in ``router_dtype``: the fused
        projection from its weight, outside autocast, when the router is exactly an
        nn.Linear with no hooks; else the router's own forward, or an adapter (PEFT's
        LoRA), a parametrization or a hook on it would be silently left out (and
        untrained)."""
        router = self.router
        if type(router) is nn.Linear and not (router._forward_hooks
                                              or router._forward_pre_hooks):
            with torch.autocast(x_TD.device.type, enabled=False):
                return router_logits(x_TD, router.weight, router_dtype)
        return router(x_TD).to(router_dtype)

    def _route_nothing(self, logits_TE: torch.Tensor) -> tuple:
        """Routing of an empty batch: ops.route wants at least one token. On an
        expert-parallel rank (an uneven last batch) the other ranks still wait for this
        one in both all-to-alls and may send it tokens for its experts. Empty weights, still
        computed from the router's logits so its weight gets a (zero) gradient and DDP
        sees it used; no balance losses (no tokens to average over)."""
        k, device = self.config.top_k, logits_TE.device
        return (logits_TE[:, :k], torch.zeros(0, k, dtype=torch.int32, device=device),
                torch.zeros(self.config.n_experts, dtype=torch.int32, device=device))

    def _router_entropy(self, logits_TE: torch.Tensor) -> torch.Tensor:
        scores_TE = (logits_TE.softmax(-1) if self.config.score == "softmax"
                     else logits_TE.sigmoid())
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        return -(probs_TE * probs_TE.clamp_min(1e-30).log()).sum(-1).mean()

    def _apply_capacity(self, weights_TK, experts_TK, counts_E, n_tokens):
        """Drop the copies past each expert's capacity (later tokens first): they get
        expert id -1 (permuted after every expert, never computed) and weight 0."""
        c = self.config
        # An expert takes at most one copy per token: a factor past E/K changes nothing,
        # and capping it first keeps factor * T * K finite (1e308 overflowed).
        factor = min(c.capacity_factor, c.n_experts / c.top_k)
        capacity = math.ceil(factor * n_tokens * c.top_k / c.n_experts)
        offsets_E, row_map_TK = ops.expert_index(experts_TK, c.n_experts)
        starts_E = offsets_E - counts_E
        rank_TK = row_map_TK - starts_E[experts_TK.long()]  # position within its expert
        dropped_TK = rank_TK >= capacity
        experts_TK = torch.where(dropped_TK, -1, experts_TK)
        weights_TK = weights_TK.masked_fill(dropped_TK, 0.0)
        return weights_TK, experts_TK, counts_E.clamp(max=capacity), dropped_TK.sum()

    def _record(self, loss_sums, routed_E, computed_E, dropped, n_tokens, dtype) -> None:
        """Balance losses from the router's own sums (``loss_sums``: score_sum_E and
        lse_sq_sum, present when training with a loss on) and the copies routed to each
        expert (``routed_E``), in the router's ``dtype``; the stats count the copies
        computed (``computed_E``: routed_E less those past capacity)."""
        c = self.config
        aux = z = routed_E.new_zeros((), dtype=dtype)
        if loss_sums:
            score_sum_E, lse_sq_sum = loss_sums
            if c.aux_loss_coef > 0:
                # Switch load balance: E * sum_e (fraction of copies to e) * (mean score of e).
                fraction_E = routed_E.to(dtype) / (n_tokens * c.top_k)
                aux = c.aux_loss_coef * c.n_experts * (fraction_E * score_sum_E).sum() / n_tokens
            if c.z_loss_coef > 0:
                z = c.z_loss_coef * lse_sq_sum / n_tokens
        if getattr(_replaying, "active", False):
            # A checkpoint replay (run through here when torch's early stop is off) must
            # still compute the losses, whose saved tensors the recompute checks, but keep
            # the forward's record: its counts are in, and its aux_loss is the one the
            # loss was built from (the replay's would hold the recomputed graph alive).
            return
        if self.training and not torch.is_grad_enabled():
            # No step learns from this forward. Under reentrant checkpointing it is the
            # first pass, and the replay in backward records again: counting both would
            # count the batch twice, and the router would get nothing from this aux_loss.
            if c.aux_loss_coef > 0 or c.z_loss_coef > 0:
                warnings.warn(
                    "MoE: a training-mode forward without gradients (torch.no_grad, or the "
                    "first pass of torch.utils.checkpoint(..., use_reentrant=True)): its "
                    "aux_loss carries no gradient, so the router learns nothing from the "
                    "balance losses; checkpoint with use_reentrant=False, or call eval() "
                    "for a forward that trains nothing", stacklevel=3)
        elif self.training and self.expert_bias is not None:
            self.pending_counts += routed_E
        self.aux_loss = aux + z
        # The stats' losses live in one new stacked tensor, never a detached alias or a
        # clone of aux_loss: under torch.compile an output aliasing another output that
        # requires grad breaks the compiled backward (torch 2.14).
        losses = torch.stack([aux, z]).detach()
        self.last_stats = MoEStats(computed_E.detach(), dropped.detach(), losses[0], losses[1])

    @torch.no_grad()
    def update_bias(self) -> None:
        """DeepSeek-V3's aux-loss-free balancing step: raise the selection bias of
        under-loaded experts and lower it for over-loaded ones by bias_update_rate,
        from the counts seen since the last call (so it composes with gradient
        accumulation). Call once per optimizer step."""
        if self.expert_bias is None:
            return
        if self.ep_group is not None:
            # Every rank routes its own tokens: balance on the counts of them all, so
            # the replicated bias stays the same on every rank.
            torch.distributed.all_reduce(self.pending_counts, group=self.ep_group)
        counts_E = self.pending_counts.float()
        if counts_E.sum() > 0:
            self.expert_bias += self.config.bias_update_rate * torch.sign(counts_E.mean() - counts_E)
        self.pending_counts.zero_()


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the auxiliary losses (load balance + z-loss) of every MoE layer's last
    forward; add it to the task loss."""
    _check_model("moe_aux_loss", model)
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoE) and m.aux_loss is not None]
    if not losses:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return torch.stack(losses).sum()


def moe_update_bias(model: nn.Module, group=None) -> None:
    """Apply update_bias() to every MoE layer of ``model`` (once per optimizer step).

    Under data parallelism (DDP, FSDP) each rank counted only its own tokens: pass the
    data-parallel process group (e.g. ``torch.distributed.group.WORLD``) and the counts
    are summed over it first, in one collective for all the layers, so every rank takes
    the same step from the whole batch's routing. Without it, under FSDP each rank's
    bias would follow its own tokens and drift from the others' (the bias is a buffer,
    which FSDP neither shards nor syncs); under DDP, rank 0's buffers overwrite the
    others' at each forward, balancing on rank 0's tokens alone. (A layer with an
    ep_group also sums over that group: where it lies within ``group`` every count is
    then taken the same number of times, which leaves the step, the sign of each
    expert's imbalance, unchanged.)"""
    _check_model("moe_update_bias", model)
    layers = [m for m in model.modules() if isinstance(m, MoE) and m.expert_bias is not None]
    if group is not None and layers:
        counts = torch.cat([layer.pending_counts for layer in layers])  # layers' E may differ
        torch.distributed.all_reduce(counts, group=group)
        sizes = [layer.pending_counts.numel() for layer in layers]
        for layer, summed in zip(layers, counts.split(sizes)):
            layer.pending_counts.copy_(summed)
    for layer in layers:
        layer.update_bias()


def _check_model(caller: str, model) -> None:
    # A list of layers or None failed on .modules(), naming neither the call nor the fix.
    if not isinstance(model, nn.Module):
        hint = (" (wrap a list of layers in torch.nn.ModuleList)"
                if isinstance(model, (list, tuple)) else "")
        raise TypeError(f"{caller}: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}{hint}")
