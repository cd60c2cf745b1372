"""A small decoder-only language model around ``dsv3.MoE``: the model the trainer,
the evaluation suite and the demo run.

RMSNorm, rotary attention through ``scaled_dot_product_attention`` (causal,
grouped-query), and SwiGLU feed-forward layers that are dense in the first
``n_dense_layers`` blocks and ``dsv3.MoE`` after them (DeepSeek-V3 keeps its first
layers dense: early layers gain little from experts). Presets go from ``tiny``
(trains in minutes on 2 CPU cores) to a DeepSeek-V3-shaped configuration.

Activation checkpointing per block: ``"full"`` recomputes the whole block in the
backward; ``"selective"`` keeps the matmul outputs and the router's decisions and
recomputes only the cheap elementwise work. Under ``torch.compile`` only ``"full"`` runs
(see ``Transformer.compile``).
"""
import contextlib
import copy
import functools
import inspect
import threading
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

from dsv3.moe import MoE, MoEConfig, SwiGLUMLP, recomputing
from dsv3.validate import WrongType, number, of_type, whole_number

CHECKPOINTING = ("none", "full", "selective")


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None: as many as n_heads
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    n_dense_layers: int = 1  # the first blocks use a dense FFN (DeepSeek-V3 style)
    dense_ffn_dim: int = 512
    moe: MoEConfig | None = None  # None: every block dense
    tie_embeddings: bool = False

    def __post_init__(self):
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            raise WrongType(f"ModelConfig: moe must be a MoEConfig, a dict of its fields or None, "
                            f"got {self.moe!r}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "dense_ffn_dim"):
            whole_number(f"ModelConfig: {name}", getattr(self, name), 1)
        if self.n_kv_heads is not None:  # None: as many as n_heads; 0 is no head at all
            whole_number("ModelConfig: n_kv_heads", self.n_kv_heads, 1)
        whole_number("ModelConfig: n_dense_layers", self.n_dense_layers, 0)
        number("ModelConfig: rope_theta", self.rope_theta, 0, low_open=True)
        number("ModelConfig: norm_eps", self.norm_eps, 0, low_open=True)
        of_type("ModelConfig: tie_embeddings", self.tie_embeddings, bool)
        kv_heads = self.n_kv_heads or self.n_heads
        if self.dim % self.n_heads or self.n_heads % kv_heads:
            raise ValueError(f"ModelConfig: n_heads={self.n_heads} must divide dim={self.dim} and "
                             f"be a multiple of n_kv_heads={kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"ModelConfig: the head dim {self.dim // self.n_heads} must be even "
                             f"(rotary embeddings rotate pairs)")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ValueError(f"ModelConfig: n_dense_layers must be in [0, n_layers="
                             f"{self.n_layers}], got {self.n_dense_layers}")
        if self.moe is not None and self.moe.dim != self.dim:
            raise ValueError(f"ModelConfig: moe.dim={self.moe.dim} must equal dim={self.dim}")

    def to_dict(self) -> dict:
        return asdict(self)


def _moe(dim, ffn_dim, n_experts, top_k, **extra) -> MoEConfig:
    return MoEConfig(dim=dim, ffn_dim=ffn_dim, n_experts=n_experts, top_k=top_k, **extra)


PRESETS = {
    # ~0.6M parameters: the demo's model, minutes on 2 CPU cores.
    "tiny": ModelConfig(vocab_size=2048, dim=64, n_layers=3, n_heads=4, max_seq_len=256,
                        n_dense_layers=1, dense_ffn_dim=192, moe=_moe(64, 96, 8, 2)),
    # ~23M parameters, ~9.3M of them active per token (2 of 16 routed experts + 1 shared).
    "small": ModelConfig(vocab_size=8192, dim=256, n_layers=6, n_heads=8, max_seq_len=1024,
                         n_dense_layers=1, dense_ffn_dim=768, moe=_moe(256, 256, 16, 2,
                                                                       n_shared_experts=1)),
    # DeepSeek-V3's shape (671B total, 37B active): for the memory planner, not for CPUs.
    "deepseek-v3": ModelConfig(
        vocab_size=129280, dim=7168, n_layers=61, n_heads=128, max_seq_len=4096,
        n_dense_layers=3, dense_ffn_dim=18432,
        moe=_moe(7168, 2048, 256, 8, n_shared_experts=1, score="sigmoid", n_groups=8,
                 topk_groups=4, route_scale=2.5, aux_loss_coef=0.0, bias_update_rate=1e-3)),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A copy of ``PRESETS[name]`` with ``overrides``; deep, so that changing its ``moe``
    leaves the preset (and every later ``preset(name)``) alone. A dict for ``moe``
    changes those of the preset's MoE fields it names (``moe={"top_k": 4}``), as
    ``--set model_overrides.moe.top_k=4`` means; a new ``dim`` carries over to the MoE
    layers, whose dim must equal it, unless ``moe`` sets theirs."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    base = copy.deepcopy(PRESETS[name])
    moe = overrides.get("moe")
    if isinstance(moe, dict):
        known = {f.name for f in fields(MoEConfig)}
        unknown = sorted(set(moe) - known)
        if unknown:
            raise ValueError(f"moe: unknown keys {unknown}; known: {sorted(known)}")
        merged = {**(asdict(base.moe) if base.moe is not None else {}), **moe}
        if "dim" in overrides and "dim" not in moe:
            merged["dim"] = overrides["dim"]
        overrides["moe"] = merged
    elif "moe" not in overrides and "dim" in overrides and base.moe is not None:
        overrides["moe"] = replace(base.moe, dim=overrides["dim"])
    return replace(base, **overrides)


def rope_tables(head_dim: int, seq_len: int, theta: float, device=None,
                dtype=torch.float32):
    """cos/sin [S, head_dim/2] of the rotary embedding (fp32, or fp64 for an fp64 model:
    computed in fp32 they hold it to fp32 accuracy, and its gradchecks fail)."""
    freqs_H = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim)
    angles_SH = torch.outer(torch.arange(seq_len, device=device, dtype=dtype), freqs_H)
    return angles_SH.cos(), angles_SH.sin()


def apply_rope(x_BNSH, cos_SH, sin_SH):
    """Rotate channel pairs (first half, second half) of each head by its position, in
    fp32 at least (fp64 stays fp64)."""
    first, second = x_BNSH.to(torch.promote_types(x_BNSH.dtype, torch.float32)).chunk(2, dim=-1)
    rotated = torch.cat([first * cos_SH - second * sin_SH, first * sin_SH + second * cos_SH], -1)
    return rotated.to(x_BNSH.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads or config.n_heads
        self.head_dim = config.dim // config.n_heads
        self.qkv = nn.Linear(config.dim, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim,
                             bias=False)
        self.out = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x_BSD, cos_SH, sin_SH, kv_cache=None):
        batch, seq, _ = x_BSD.shape
        q, k, v = self.qkv(x_BSD).split([self.n_heads * self.head_dim,
                                         self.n_kv_heads * self.head_dim,
                                         self.n_kv_heads * self.head_dim], dim=-1)
        # Sizes spelled out, not -1: an empty batch or sequence has none to infer.
        q_BNSH = apply_rope(q.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2),
                            cos_SH, sin_SH)
        k_BNSH = apply_rope(k.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2),
                            cos_SH, sin_SH)
        v_BNSH = v.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            k_BNSH, v_BNSH = kv_cache.update(self, k_BNSH, v_BNSH)
        # Causal over the cached prefix too: query i sits at absolute position prefix + i.
        prefix = k_BNSH.shape[2] - seq
        mask = None if prefix == 0 else torch.ones(
            seq, k_BNSH.shape[2], dtype=torch.bool, device=x_BSD.device).tril(prefix)
        y_BNSH = F.scaled_dot_product_attention(q_BNSH, k_BNSH, v_BNSH, attn_mask=mask,
                                                is_causal=mask is None and seq > 1,
                                                enable_gqa=self.n_kv_heads != self.n_heads)
        return self.out(y_BNSH.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        dense = config.moe is None or layer < config.n_dense_layers
        self.ffn = SwiGLUMLP(config.dim, config.dense_ffn_dim) if dense else MoE(config.moe)

    def forward(self, x_BSD, cos_SH, sin_SH, kv_cache=None):
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos_SH, sin_SH, kv_cache)
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))

    def residual_projections(self) -> list[nn.Module]:
        """The projections that write into the residual stream: attention's ``out``, the
        dense FFN's ``down_proj`` or the shared experts' one. Their output only feeds an
        add, which nothing in the backward reads: selective checkpointing recomputes it."""
        projections = [self.attn.out]
        if isinstance(self.ffn, SwiGLUMLP):
            projections.append(self.ffn.down_proj)
        elif self.ffn.shared_experts is not None:
            projections.append(self.ffn.shared_experts.down_proj)
        return projections


# What selective checkpointing keeps: matmuls (their recomputation is the cost) and
# the router's decisions (recomputing them is cheap, but keeping them guarantees the
# backward sees the same routing); everything elementwise is recomputed.
_SAVED_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
              torch.ops.aten.bmm.default,
              torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
              torch.ops.aten._scaled_dot_product_efficient_attention.default,
              torch.ops.aten._scaled_dot_product_flash_attention.default}
_SAVED_DSV3_OPS = ("route", "grouped_mm", "grouped_mm_gather")


# What selective checkpointing keeps goes through saved-tensor hooks like any saved
# tensor (so the trainer's activation-memory count sees it), where torch offers it.
_SAC_HOOKS = ({"respect_saved_tensors_hooks": True}
              if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters else {})

# Where it does not (torch 2.11: the caching mode keeps the outputs in its own store,
# past the hooks), a counter registers here and is handed each tensor kept instead.
_kept_observer = threading.local()


@contextlib.contextmanager
def observing_selective_saves(observe):
    """While active (in this thread, as saved-tensor hooks are), selective checkpointing
    hands ``observe`` each op output it keeps for the backward, on a torch whose
    saved-tensor hooks miss those; a no-op where the hooks see them (_SAC_HOOKS), so a
    counter that is also a hook counts them once and pays nothing more there."""
    if _SAC_HOOKS:
        yield
        return
    outer = getattr(_kept_observer, "observe", None)
    _kept_observer.observe = observe
    try:
        yield
    finally:
        _kept_observer.observe = outer


# Set while a residual projection (Block.residual_projections) runs, for the policy.
_in_residual_projection = threading.local()


def _selective_policy(ctx, op, *args, **kwargs):
    """Keep matmul and routing outputs, except the projections whose output only
    feeds a residual add (nothing in the backward reads it: keeping it is waste)."""
    kept_dsv3_op = getattr(op, "namespace", None) == "dsv3" and op._opname in _SAVED_DSV3_OPS
    if op in _SAVED_OPS or kept_dsv3_op:
        # Told by the module running, not by the weight's storage: under autocast the
        # matmul reads autocast's bf16 copy of the weight, a storage of its own. (A
        # projection's matmul is a dsv3 grouped_mm where a bf16 HalfLinear multiplies
        # fp32 copies on the CPU: dsv3/ops/linear.py.)
        saved = not getattr(_in_residual_projection, "active", False)
    else:
        saved = False
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


def _enter_residual_projection(module, args):
    _in_residual_projection.active = True


def _leave_residual_projection(module, args, output):
    _in_residual_projection.active = False


@contextlib.contextmanager
def _marking(projections: list[nn.Module]):
    """Hooks on ``projections`` that flag their forward for _selective_policy, only
    while the checkpointed forward or its replay runs (the same ops, so the policy
    decides the same way both times). Around the checkpoint call for the forward: the
    forward context must be checkpoint's own mode, which it configures by type."""
    handles = []
    try:
        for module in projections:
            handles.append(module.register_forward_pre_hook(_enter_residual_projection))
            handles.append(module.register_forward_hook(_leave_residual_projection,
                                                        always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _checkpoint_contexts(mode: str, residual_projections: list[nn.Module]):
    """(forward context, recompute context); the recompute one also tells the MoE
    layers that this forward is a replay (their balance counts must not double)."""
    if mode == "full":
        return contextlib.nullcontext(), _replay(contextlib.nullcontext())
    observe = getattr(_kept_observer, "observe", None)
    if observe is None:
        forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(_selective_policy)
    else:  # counting, on a torch whose hooks miss what the forward keeps (only there: one
        # taking respect_saved_tensors_hooks finds its mode by type, which this would hide)
        kept = _KeptOutputs(observe)
        forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(kept.policy)
        forward_ctx = _entered_together(forward_ctx, kept)
    return forward_ctx, _replay(recompute_ctx, _marking(residual_projections))


class _KeptOutputs(TorchDispatchMode):
    """Entered above checkpoint's caching mode in the forward: every op passes through
    here on its way there. The caching mode decides through ``policy``, which notes the
    decision, and the output of an op it kept goes to ``observe`` once it returns (the
    policy itself only sees the op and its inputs)."""

    def __init__(self, observe):
        super().__init__()
        self.observe, self.keeps = observe, False

    def policy(self, ctx, op, *args, **kwargs):
        decision = _selective_policy(ctx, op, *args, **kwargs)
        if not ctx.is_recompute:
            self.keeps = decision in (CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_SAVE)
        return decision

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.keeps = False  # an op the caching mode ignores never asks the policy
        out = func(*args, **(kwargs or {}))
        if self.keeps:
            for tensor in _tensors(out):
                self.observe(tensor)
        return out


def _tensors(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for item in out:
            yield from _tensors(item)


@contextlib.contextmanager
def _entered_together(outer, inner):
    with outer, inner:
        yield


@contextlib.contextmanager
def _replay(recompute_ctx, marking=None):
    with recomputing(), marking or contextlib.nullcontext(), recompute_ctx:
        yield


def _refusal(message: str):
    """A function raising ValueError(message) that torch.compile never traces: called in
    a compiled forward it raises when run, or under fullgraph=True fails the compile with
    ``message`` as the reason (an exception raised in traced code loses its message)."""
    def refuse():
        raise ValueError(message)
    # (An older torch takes no reason: its fullgraph error then names only the function.)
    takes_reason = "reason" in inspect.signature(torch.compiler.disable).parameters
    return torch.compiler.disable(refuse, **({"reason": message} if takes_reason else {}))


# Dynamo's setting that lets a checkpointed region's Python side effects (the MoE's
# recorded losses and counts) happen once, in the forward, and not again in the recompute.
_SKIP_REPLAY = "skip_fwd_side_effects_in_bwd_under_checkpoint"
_SKIP_REPLAY_FLAG = f"torch._dynamo.config.{_SKIP_REPLAY}"
_refuse_selective_compiled = _refusal(
    "Transformer: checkpointing='selective' does not run under torch.compile: its policy "
    "tells the residual projections apart by the module running, which a compiled graph no "
    "longer shows; use checkpointing='full' or 'none'")
_refuse_full_compiled = _refusal(
    f"Transformer: checkpointing='full' under torch.compile needs {_SKIP_REPLAY_FLAG} = True "
    "(the MoE layers record their losses and balance counts in the forward; compiled "
    "checkpointing can only replay that or skip it, and only skipping is right): set it, or "
    "compile with model.compile(), which sets it for the model's own calls")


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._tie_weights()
        self.init_rope()
        # load_state_dict(assign=True) on a meta-device model leaves the tables on meta.
        self.register_load_state_dict_post_hook(_init_rope_after_load)
        self.checkpointing = "none"
        self.apply(self._init_weights)

    def init_rope(self, device=None) -> None:
        """(Re)compute the rotary tables ``rope_cos``/``rope_sin`` on ``device`` (default:
        where they are), in their dtype. They are non-persistent buffers, in no state dict:
        after ``to_empty()`` (a model built on the meta device) they would hold
        uninitialized memory that no ``load_state_dict`` refills. ``to_empty()`` and the
        other ``.to()`` moves, and ``load_state_dict``, call this themselves."""
        c = self.config
        old_cos = self._buffers.get("rope_cos")
        if device is None and old_cos is not None:
            device = old_cos.device
        wanted = old_cos.dtype if old_cos is not None else torch.float32
        cos_SH, sin_SH = rope_tables(c.dim // c.n_heads, c.max_seq_len, c.rope_theta, device,
                                     torch.float64 if wanted == torch.float64 else torch.float32)
        for name, table_SH in (("rope_cos", cos_SH), ("rope_sin", sin_SH)):
            buffer = self._buffers.get(name)
            if buffer is not None and buffer.device == table_SH.device and (
                    buffer.shape == table_SH.shape):
                with torch.no_grad():
                    buffer.copy_(table_SH)  # in place: shared memory, captured graphs keep it
            else:
                dtype = buffer.dtype if buffer is not None else table_SH.dtype
                self.register_buffer(name, table_SH.to(dtype), persistent=False)

    def _tie_weights(self) -> None:
        """The head shares the embedding's Parameter (tie_embeddings). Done again after
        to_empty() and load_state_dict(assign=True), which give each its own tensor:
        they were counted twice and trained apart."""
        if self.config.tie_embeddings:
            self.head.weight = self.embed.weight

    def _apply(self, fn, recurse=True):
        # to_empty() (and every .to()) goes through here: the tables are recomputed
        # rather than kept as whatever fn made of them (uninitialized, for to_empty).
        module = super()._apply(fn, recurse)
        self._tie_weights()
        self.init_rope()
        return module

    def compile(self, *args, **kwargs) -> None:
        """``nn.Module.compile``, whose compiled calls run with
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint set, for
        them only: full checkpointing then compiles, the MoE layers' losses and balance
        counts recorded once by the forward and not again by the recompute, as in eager.
        ``torch.compile(model)`` with checkpointing needs that setting set by the caller."""
        super().compile(*args, **kwargs)
        if not hasattr(torch._dynamo.config, _SKIP_REPLAY):  # an older torch: forward refuses
            return
        compiled_call = self._compiled_call_impl

        def call_skipping_replayed_side_effects(*call_args, **call_kwargs):
            with torch._dynamo.config.patch(**{_SKIP_REPLAY: True}):
                return compiled_call(*call_args, **call_kwargs)
        self._compiled_call_impl = call_skipping_replayed_side_effects

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, MoE):
            # The routed experts are bare Parameters, not Linears: they kept MoE's own
            # uniform init (std 1/sqrt(3 fan_in): 0.036 in "small", 0.007 in
            # "deepseek-v3") where every other matmul weight here, the router and the
            # shared experts included, starts at std 0.02.
            nn.init.normal_(module.gate_up_proj, std=0.02)
            nn.init.normal_(module.down_proj, std=0.02)

    def set_checkpointing(self, mode: str) -> None:
        if mode not in CHECKPOINTING:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {mode!r}")
        self.checkpointing = mode

    def forward(self, tokens_BS: torch.Tensor, kv_cache=None) -> torch.Tensor:
        if tokens_BS.dim() != 2 or tokens_BS.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"Transformer: tokens_BS must be an int tensor [batch, seq], got "
                             f"{tokens_BS.dtype} {tuple(tokens_BS.shape)}")
        if (tokens_BS.device.type == "cpu" and tokens_BS.numel()
                and not torch.compiler.is_compiling() and (
                    tokens_BS.min() < 0 or tokens_BS.max() >= self.config.vocab_size)):
            # nn.Embedding said "index out of range in self". Not checked on the GPU,
            # where reading the ids back would wait for the device every step (it
            # fails there with a device-side assert), nor in a compiled graph (a branch
            # on values breaks it).
            raise ValueError(f"Transformer: tokens_BS holds ids from {int(tokens_BS.min())} "
                             f"to {int(tokens_BS.max())}, outside the vocabulary [0, "
                             f"{self.config.vocab_size})")
        start = kv_cache.length if kv_cache is not None else 0
        seq = tokens_BS.shape[1]
        if start + seq > self.config.max_seq_len:
            raise ValueError(f"Transformer: {start + seq} positions exceed max_seq_len="
                             f"{self.config.max_seq_len}")
        cos_SH, sin_SH = self.rope_cos[start:start + seq], self.rope_sin[start:start + seq]
        x_BSD = self.embed(tokens_BS)
        checkpointing = self.checkpointing != "none" and self.training and kv_cache is None
        if checkpointing and torch.compiler.is_compiling():
            # Dynamo takes no context_fn but a selective one (and no closure at all), and
            # refuses the MoE's side effects in a checkpoint without the setting.
            if self.checkpointing == "selective":
                _refuse_selective_compiled()
            elif not getattr(torch._dynamo.config, _SKIP_REPLAY, False):
                _refuse_full_compiled()
        for block in self.blocks:
            if checkpointing and torch.compiler.is_compiling():
                x_BSD = checkpoint(block, x_BSD, cos_SH, sin_SH, use_reentrant=False)
            elif checkpointing:
                projections = block.residual_projections()
                with (_marking(projections) if self.checkpointing == "selective"
                      else contextlib.nullcontext()):
                    x_BSD = checkpoint(block, x_BSD, cos_SH, sin_SH, use_reentrant=False,
                                       context_fn=functools.partial(
                                           _checkpoint_contexts, self.checkpointing,
                                           projections),
                                       **_SAC_HOOKS)
            else:
                x_BSD = block(x_BSD, cos_SH, sin_SH, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(seq)
        return self.head(self.norm(x_BSD))

    def moe_layers(self) -> list[MoE]:
        return [block.ffn for block in self.blocks if isinstance(block.ffn, MoE)]

    def num_parameters(self, active: bool = False) -> int:
        """All parameters, or those one token uses (top_k + shared of the experts)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        for moe in self.moe_layers():
            c = moe.config
            per_expert = (moe.gate_up_proj.numel() + moe.down_proj.numel()) // len(moe.expert_range)
            total -= per_expert * (len(moe.expert_range) - c.top_k)
        return total


def _init_rope_after_load(model: Transformer, incompatible_keys) -> None:
    # On the weights' device: after load_state_dict(assign=True) from the meta device
    # they hold the loaded tensors while the tables are still on meta.
    model._tie_weights()
    model.init_rope(model.embed.weight.device)


class KVCache:
    """Keys and values of the tokens seen so far, per attention layer, for decoding
    one token at a time without recomputing the prefix."""

    def __init__(self):
        self.length = 0
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, layer: nn.Module, k_BNSH, v_BNSH):
        cached = self._layers.get(id(layer))
        if cached is not None:
            k_BNSH = torch.cat([cached[0], k_BNSH], dim=2)
            v_BNSH = torch.cat([cached[1], v_BNSH], dim=2)
        self._layers[id(layer)] = (k_BNSH, v_BNSH)
        return k_BNSH, v_BNSH

    def advance(self, n: int) -> None:
        self.length += n


__all__ = ["ModelConfig", "PRESETS", "preset", "Transformer", "KVCache", "CHECKPOINTING"]
