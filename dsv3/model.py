"""A small decoder-only language model around ``dsv3.MoE``: the model the trainer,
the evaluation suite and the demo run.

RMSNorm, rotary attention through ``scaled_dot_product_attention`` (causal,
grouped-query), and SwiGLU feed-forward layers that are dense in the first
``n_dense_layers`` blocks and ``dsv3.MoE`` after them (DeepSeek-V3 keeps its first
layers dense: early layers gain little from experts). Presets go from ``tiny``
(trains in minutes on 2 CPU cores) to a DeepSeek-V3-shaped configuration.

Activation checkpointing per block: ``"full"`` recomputes the whole block in the
backward; ``"selective"`` keeps the matmul outputs and the router's decisions and
recomputes only the cheap elementwise work.
"""
import contextlib
import functools
import inspect
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

from dsv3.moe import MoE, MoEConfig, SwiGLUMLP, recomputing

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
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "dense_ffn_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig: {name} must be a positive int, got {value!r}")
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
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def rope_tables(head_dim: int, seq_len: int, theta: float, device=None):
    """cos/sin [S, head_dim/2] of the rotary embedding (fp32)."""
    freqs_H = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles_SH = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), freqs_H)
    return angles_SH.cos(), angles_SH.sin()


def apply_rope(x_BNSH, cos_SH, sin_SH):
    """Rotate channel pairs (first half, second half) of each head by its position."""
    first, second = x_BNSH.float().chunk(2, dim=-1)
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
        q_BNSH = apply_rope(q.view(batch, seq, -1, self.head_dim).transpose(1, 2), cos_SH, sin_SH)
        k_BNSH = apply_rope(k.view(batch, seq, -1, self.head_dim).transpose(1, 2), cos_SH, sin_SH)
        v_BNSH = v.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            k_BNSH, v_BNSH = kv_cache.update(self, k_BNSH, v_BNSH)
        # Causal over the cached prefix too: query i sits at absolute position prefix + i.
        prefix = k_BNSH.shape[2] - seq
        mask = None if prefix == 0 else torch.ones(
            seq, k_BNSH.shape[2], dtype=torch.bool, device=x_BSD.device).tril(prefix)
        y_BNSH = F.scaled_dot_product_attention(q_BNSH, k_BNSH, v_BNSH, attn_mask=mask,
                                                is_causal=mask is None and seq > 1,
                                                enable_gqa=self.n_kv_heads != self.n_heads)
        return self.out(y_BNSH.transpose(1, 2).reshape(batch, seq, -1))


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


def _selective_policy(residual_weights, ctx, op, *args, **kwargs):
    """Keep matmul and routing outputs, except the projections whose output only
    feeds a residual add (nothing in the backward reads it: keeping it is waste)."""
    if op in _SAVED_OPS:
        reads_residual_weight = any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr()
                                    in residual_weights for a in args)
        saved = not reads_residual_weight
    else:
        saved = getattr(op, "namespace", None) == "dsv3" and op._opname in _SAVED_DSV3_OPS
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpoint_contexts(mode: str, residual_weights: set):
    """(forward context, recompute context); the recompute one also tells the MoE
    layers that this forward is a replay (their balance counts must not double)."""
    if mode == "full":
        forward_ctx, recompute_ctx = contextlib.nullcontext(), contextlib.nullcontext()
    else:
        forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(
            functools.partial(_selective_policy, residual_weights))
    return forward_ctx, _replay(recompute_ctx)


@contextlib.contextmanager
def _replay(recompute_ctx):
    with recomputing(), recompute_ctx:
        yield


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        cos_SH, sin_SH = rope_tables(config.dim // config.n_heads, config.max_seq_len,
                                     config.rope_theta)
        self.register_buffer("rope_cos", cos_SH, persistent=False)
        self.register_buffer("rope_sin", sin_SH, persistent=False)
        self.checkpointing = "none"
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def set_checkpointing(self, mode: str) -> None:
        if mode not in CHECKPOINTING:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {mode!r}")
        self.checkpointing = mode

    def forward(self, tokens_BS: torch.Tensor, kv_cache=None) -> torch.Tensor:
        if tokens_BS.dim() != 2 or tokens_BS.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"Transformer: tokens_BS must be an int tensor [batch, seq], got "
                             f"{tokens_BS.dtype} {tuple(tokens_BS.shape)}")
        start = kv_cache.length if kv_cache is not None else 0
        seq = tokens_BS.shape[1]
        if start + seq > self.config.max_seq_len:
            raise ValueError(f"Transformer: {start + seq} positions exceed max_seq_len="
                             f"{self.config.max_seq_len}")
        cos_SH, sin_SH = self.rope_cos[start:start + seq], self.rope_sin[start:start + seq]
        x_BSD = self.embed(tokens_BS)
        for block in self.blocks:
            if self.checkpointing != "none" and self.training and kv_cache is None:
                x_BSD = checkpoint(block, x_BSD, cos_SH, sin_SH, use_reentrant=False,
                                   context_fn=lambda: _checkpoint_contexts(
                                       self.checkpointing, self._residual_weights()),
                                   **_SAC_HOOKS)
            else:
                x_BSD = block(x_BSD, cos_SH, sin_SH, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(seq)
        return self.head(self.norm(x_BSD))

    def _residual_weights(self) -> set:
        """Storages of the projections that write into the residual stream."""
        weights = []
        for block in self.blocks:
            weights.append(block.attn.out.weight)
            ffn = block.ffn
            if isinstance(ffn, SwiGLUMLP):
                weights.append(ffn.down_proj.weight)
            elif ffn.shared_experts is not None:
                weights.append(ffn.shared_experts.down_proj.weight)
        return {w.untyped_storage().data_ptr() for w in weights}

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
