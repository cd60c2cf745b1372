"""``from_module`` / ``to_module``: a transformers sparse MoE block <-> a dsv3.MoE,
handing the same Parameter objects across (no copy, ``data_ptr()`` unchanged).

The expert layouts already agree (see architectures.py), so moving weights is
assignment. The one copy: a plain dsv3.MoE's shared experts are one fused SwiGLU
MLP, while the HF plain shared experts (DeepSeek-V3's and alike) keep gate and up as
separate Linears; ``to_module`` splits the fused weight into two new Parameters (a
copy, and the new ones no longer alias the dsv3 module's). A TransformersMoE made by
``from_module`` holds the HF shared-expert modules themselves, so its round trip
copies nothing.
"""
import inspect

import torch
from torch import nn

from dsv3.integrations.transformers import gpt_oss
from dsv3.integrations.transformers.architectures import (architecture_for, architecture_of,
                                                          supported)
from dsv3.integrations.transformers.block import TransformersMoE, hf_module_order
from dsv3.integrations.transformers.experts import swiglu_limit, unsupported_reason
from dsv3.integrations.transformers.wrappers import refuse_foreign
from dsv3.moe import MoE, MoEConfig, SwiGLUMLP

# MoEConfig fields that must agree between a dsv3.MoE and the HF block it becomes.
_LAYER_FIELDS = ("dim", "ffn_dim", "n_experts", "top_k", "n_shared_experts", "score", "n_groups",
                 "topk_groups", "group_score", "route_scale", "normalize_weights", "swiglu_limit")


def _differs(field: str, have: MoEConfig, want: MoEConfig) -> bool:
    # How groups are scored matters only where there are groups to score.
    if field == "group_score" and have.n_groups == want.n_groups == 1:
        return False
    return getattr(have, field) != getattr(want, field)


def _get(module: nn.Module, path: str):
    return module.get_submodule(path) if path else module  # "" is the module itself


def _get_attr(module: nn.Module, path: str):
    parent, _, name = path.rpartition(".")
    return getattr(_get(module, parent), name)


def _set_attr(module: nn.Module, path: str, value) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(module, parent), name, value)


def _moe_config(arch, block: nn.Module, arg: str = "block") -> MoEConfig:
    """The MoEConfig of ``block``; a ValueError naming ``arg`` (the argument ``block``
    came from) if dsv3.MoE cannot compute it."""
    experts, router = block.experts, getattr(block, arch.gate)
    refused = arch.refuse(block) if arch.refuse is not None else None
    if refused is not None:
        setting, why = refused
        raise ValueError(f"{arg}: {arch.name} with {setting} cannot become a dsv3.MoE: {why}")
    reason = unsupported_reason(experts)
    if reason is None and experts.is_transposed:
        reason = "its expert weights are stored transposed"
    if reason is not None:
        raise ValueError(f"{arg}: this {type(block).__name__} cannot become a dsv3.MoE: {reason}")
    n_shared = 0
    shared = _shared_module(arch, block)
    if shared is not None and not arch.gated_shared:  # plain ones of n * ffn_dim, as dsv3.MoE's
        n_shared = shared.intermediate_size // experts.intermediate_dim
    # A clamped SwiGLU (GLM-5-Next) clamps in the routed and the shared experts alike,
    # with the one config's limit, as dsv3.MoE's shared experts do with swiglu_limit.
    # (HunYuan-V4's shared experts do not: arch.unclamped_shared, see to_module.)
    limit = swiglu_limit(experts)
    routing = arch.routing(router)
    if arch.block_routing is not None:  # what the block holds itself (Laguna's scale)
        routing |= arch.block_routing(block)
    return MoEConfig(dim=experts.hidden_dim, ffn_dim=experts.intermediate_dim,
                     n_experts=experts.num_experts, top_k=router.top_k,
                     n_shared_experts=n_shared, aux_loss_coef=0.0,
                     swiglu_limit=None if limit is None else float(limit), **routing)


def _shared_module(arch, block: nn.Module) -> nn.Module | None:
    """The block's plain shared-expert module; None where its config has none (Cohere2-MoE
    builds one only for num_shared_experts > 0)."""
    return getattr(block, arch.shared[0], None) if arch.shared else None


def _move_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Forward hooks already on the replaced router (transformers installs its
    router_logits recorder once, on first use) keep firing on its replacement."""
    for hook in list(src._forward_hooks.values()):
        dst.register_forward_hook(hook)


def from_module(block: nn.Module) -> TransformersMoE | gpt_oss.GptOssMoE:
    """A dsv3.MoE (TransformersMoE) computing what ``block`` computes, with its Parameters;
    for GPT-OSS's block (whose biased experts are no dsv3.MoE's), a gpt_oss.GptOssMoE
    holding its router and experts modules."""
    if gpt_oss.matches(block):
        return gpt_oss.GptOssMoE.from_module(block)
    arch = architecture_of(block)
    if arch is None:
        raise TypeError(f"block: {type(block).__name__} is not a supported sparse MoE block; "
                        f"supported architectures: {supported()}")
    experts, router = block.experts, getattr(block, arch.gate)
    # Before _moe_config: an adapter-wrapped experts module would read as "no gate".
    refuse_foreign(block, {"router": router, "experts": experts}, "block")
    block_cls, router_cls = arch.classes()
    moe = TransformersMoE(_moe_config(arch, block), architecture=arch, hf_config=experts.config,
                          router_cls=router_cls, dtype=experts.gate_up_proj.dtype,
                          jitter_noise=float(getattr(block, "jitter_noise", 0.0)),
                          layer_idx=_layer_idx(block, router), experts_cls=type(experts),
                          block_cls=block_cls)
    moe.router.weight = _get_attr(router, arch.gate_weight)
    moe.gate_up_proj, moe.down_proj = experts.gate_up_proj, experts.down_proj
    if arch.bias is not None:
        bias = _get_attr(block, arch.bias)
        moe.set_routing_bias(bias.view(-1) if arch.bias_rows else bias)  # a view: no copy
    if arch.gated_shared:
        moe.shared_expert, moe.shared_expert_gate = block.shared_expert, block.shared_expert_gate
    elif arch.shared:
        moe.shared_experts = _shared_module(arch, block)
    _move_hooks(router, moe.gate)
    moe.hf_keys = _hf_keys(arch, block, moe)
    moe.module_order = hf_module_order(moe)  # parameters() in the block's order
    return moe.train(block.training)


def _layer_idx(block: nn.Module, router: nn.Module) -> int | None:
    """The decoder layer index the block was built for (HunYuan-MoE-V1's router keeps
    it, and reads its per-layer moe_topk with it), or None."""
    for module in (block, router):
        if isinstance(getattr(module, "layer_idx", None), int):
            return module.layer_idx
    return None


def _hf_keys(arch, block: nn.Module, moe: TransformersMoE) -> tuple:
    """(moe's state_dict name, the block's name for the same tensor, the block's shape,
    moe's shape), in the block's state_dict order: moe holds the block's very tensors,
    but for ERNIE's [1, E] bias, of which it holds an [E] view."""
    mine = {id(t): (name, t.shape) for name, t in moe.state_dict(keep_vars=True).items()}
    keys = []
    for hf_name, t in block.state_dict(keep_vars=True).items():
        name, shape = mine.get(id(t), (None, None))
        if name is None and hf_name == arch.bias:
            name, shape = "expert_bias", moe.expert_bias.shape
        if name is None:
            raise ValueError(f"block: dsv3 has no counterpart to its {hf_name}")
        keys.append((name, hf_name, t.shape, shape))
    return tuple(keys)


def _check_fused_shared(arch, shared: SwiGLUMLP, hf_mlp: nn.Module, want: MoEConfig) -> None:
    """A plain dsv3.MoE's fused shared experts go into the HF shared MLP only where that
    MLP computes what they compute: the same width (a "plain (one)" MLP of a width that
    is no multiple of the experts' counts as fewer shared experts), and the same clamp
    (GLM-5-Next's HF MLP clamps with swiglu_limit, HunYuan-V4's does not clamp)."""
    width, hf_width = shared.down_proj.weight.shape[1], hf_mlp.gate_proj.weight.shape[0]
    if width != hf_width:
        raise ValueError(f"hf_config: its {arch.name} block's shared MLP is {hf_width} wide, "
                         f"moe's shared experts {width}")
    hf_limit = None if arch.unclamped_shared else want.swiglu_limit
    if shared.swiglu_limit != hf_limit:
        raise ValueError(f"moe: its shared experts clamp their SwiGLU with swiglu_limit="
                         f"{shared.swiglu_limit!r}, the {arch.name} block's with "
                         f"{hf_limit!r} (None: no clamp); set moe.shared_experts.swiglu_limit "
                         f"to convert it")


def _split_fused_shared(shared: SwiGLUMLP, hf_mlp: nn.Module) -> None:
    """Copy a fused [gate; up] shared MLP into an HF MLP with separate projections."""
    gate_FD, up_FD = shared.gate_up_proj.weight.detach().chunk(2, dim=0)
    hf_mlp.gate_proj.weight = nn.Parameter(gate_FD.clone())
    hf_mlp.up_proj.weight = nn.Parameter(up_FD.clone())
    hf_mlp.down_proj.weight = shared.down_proj.weight


def _hf_bias(arch, moe: MoE, hf_bias: torch.Tensor) -> torch.Tensor:
    """The selection bias to put in the block in place of ``hf_bias`` (its meta stand-in):
    ``moe``'s, in the block's form."""
    bias_E = moe.expert_bias
    if bias_E is None:  # a dsv3.MoE without a bias routes like a zero correction bias
        bias_E = torch.zeros(hf_bias.shape[-1], device=moe.gate_up_proj.device)
    if arch.bias_rows:  # stored [1, E]: the Parameter from_module took the [E] view of
        base = bias_E._base
        if (isinstance(base, nn.Parameter) and base.shape == (1, bias_E.numel())
                and base.data_ptr() == bias_E.data_ptr()):
            return base
        bias_E = bias_E.view(1, -1)  # e.g. after model.to(device): same storage
    if isinstance(hf_bias, nn.Parameter) and not isinstance(bias_E, nn.Parameter):
        bias_E = nn.Parameter(bias_E, requires_grad=False)  # AFMoE's, ERNIE's: frozen
    return bias_E


def to_module(moe: MoE | gpt_oss.GptOssMoE, hf_config=None, *,
              layer_idx: int | None = None) -> nn.Module:
    """The transformers block computing what ``moe`` computes, with its Parameters.

    A gpt_oss.GptOssMoE gives back the GptOssMLP it came from (``hf_config``, if
    given, must be a GPT-OSS config).

    A TransformersMoE rebuilds the block it came from (``hf_config`` defaults to the
    one it kept). A plain dsv3.MoE needs ``hf_config`` (e.g. a MixtralConfig, or a
    vision-language model's config, whose text_config is used): its model_type picks
    the block, whose sizes and routing must match ``moe.config``.

    ``layer_idx``: the decoder layer the block is for, where its config sets values per
    layer (HunYuan-MoE-V1's list moe_topk); a TransformersMoE defaults to the one its
    block was built for.
    """
    if isinstance(moe, gpt_oss.GptOssMoE):
        if hf_config is not None and getattr(hf_config, "model_type", None) != "gpt_oss":
            raise ValueError(f"hf_config: a GptOssMoE becomes a GPT-OSS block; got model_type "
                             f"{getattr(hf_config, 'model_type', None)!r}")
        return moe.to_module()
    if not isinstance(moe, MoE):
        raise TypeError(f"moe: expected a dsv3.MoE or a GptOssMoE, got {type(moe).__name__}")
    _check_holds_every_expert(moe)
    if hf_config is None:
        if not isinstance(moe, TransformersMoE):
            raise ValueError("hf_config: required to convert a plain dsv3.MoE (it picks the "
                             "transformers architecture)")
        # The block it came from, whatever model_type its config carries (a model may
        # be built from another architecture's classes, e.g. Sarvam-MoE from GLM-4-MoE's).
        hf_config, arch = moe.hf_config, moe.architecture
    else:
        # A vision-language model's config (Qwen3-VL-MoE's, GLM-4V-MoE's) holds the
        # block's config as its text_config; other configs are their own text config.
        if hasattr(hf_config, "get_text_config"):
            hf_config = hf_config.get_text_config()
        arch = architecture_for(getattr(hf_config, "model_type", None))
    if layer_idx is None:
        layer_idx = getattr(moe, "layer_idx", None)  # a TransformersMoE's, from from_module
    _check_no_routing_beyond(arch, moe)
    block = _new_block(arch, hf_config, layer_idx)
    if arch.bias is not None:  # first: a refusal may read its values (ERNIE-4.5-MoE's)
        _set_attr(block, arch.bias, _hf_bias(arch, moe, _get_attr(block, arch.bias)))
    want = _moe_config(arch, block, "hf_config")
    diffs = [f"{f}={getattr(moe.config, f)!r} vs {getattr(want, f)!r}" for f in _LAYER_FIELDS
             if _differs(f, moe.config, want)]
    if diffs:
        raise ValueError(f"hf_config: its {arch.name} block does not match moe.config "
                         f"(moe vs hf_config): {', '.join(diffs)}")

    _fill(arch, moe, block, want)
    left = [n for n, t in [*block.named_parameters(), *block.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"moe: nothing to fill the {arch.name} block's {', '.join(left)} from")
    if isinstance(moe, TransformersMoE):
        _move_hooks(moe.gate, getattr(block, arch.gate))
        if hasattr(block, "jitter_noise"):
            block.jitter_noise = moe.jitter_noise
    return block.train(moe.training)


def _check_no_routing_beyond(arch, moe: MoE) -> None:
    """What a plain dsv3.MoE may route with that the block has no place for: a capacity
    (the block computes every routed copy) and a selection bias where the block keeps
    none (Mixtral's). Either would make a block that routes otherwise, without a word."""
    if moe.config.capacity_factor is not None:
        raise ValueError(f"moe: capacity_factor={moe.config.capacity_factor!r}: a {arch.name} "
                         f"block has no capacity (it computes every routed copy), so it would "
                         f"not compute what moe computes; convert a layer with "
                         f"capacity_factor=None")
    bias_E = moe.expert_bias
    if arch.bias is None and bias_E is not None and bool(bias_E.ne(0).any()):
        raise ValueError(f"moe: its expert_bias (a learned selection bias, bias_update_rate="
                         f"{moe.config.bias_update_rate!r}) is non-zero, and a {arch.name} "
                         f"block chooses experts without one, so it would route otherwise; "
                         f"convert to an architecture with a selection bias (e.g. "
                         f"DeepSeek-V3's)")


def _check_holds_every_expert(moe: MoE) -> None:
    """A transformers block holds all its experts: an expert-parallel rank's layer (its
    ``expert_range`` only) would make a block routing to experts it lacks."""
    held, total = moe.gate_up_proj.shape[0], moe.config.n_experts
    if held != total:
        r = moe.expert_range
        raise ValueError(f"moe: holds {held} of its {total} experts (experts {r.start}-"
                         f"{r.stop - 1}, expert-parallel over its ep_group), where a "
                         f"transformers block holds them all; convert a layer built without "
                         f"ep_group, loaded with every expert's weights")


def hf_view(moe: TransformersMoE) -> nn.Module:
    """The transformers block on ``moe``'s current tensors, as to_module builds it but
    unchecked (its values may be uninitialized memory, as after to_empty) and with the
    router_logits hooks left on ``moe``: what transformers' weight init reads
    (block.hf_proxy_class)."""
    arch = moe.architecture
    block = _new_block(arch, moe.hf_config, moe.layer_idx)
    if arch.bias is not None:
        _set_attr(block, arch.bias, _hf_bias(arch, moe, _get_attr(block, arch.bias)))
    _fill(arch, moe, block)
    return block


def _new_block(arch, hf_config, layer_idx: int | None) -> nn.Module:
    """``arch``'s block for ``hf_config`` on the meta device (every tensor is replaced
    after), for decoder layer ``layer_idx`` where the block class takes one."""
    block_cls, _ = arch.classes()
    takes_layer = "layer_idx" in inspect.signature(block_cls).parameters
    try:
        with torch.device("meta"):
            if takes_layer:
                return block_cls(hf_config, layer_idx=layer_idx)
            return block_cls(hf_config)
    except (TypeError, IndexError) as exc:  # None, or past the list, as a list index
        if not takes_layer or (isinstance(exc, TypeError) and layer_idx is not None):
            raise
        raise ValueError(f"layer_idx: building the {arch.name} block from this hf_config needs "
                         f"the index of a decoder layer it has (a per-layer setting such as a "
                         f"list moe_topk), got {layer_idx!r}: {exc}") from exc


def _fill(arch, moe: MoE, block: nn.Module, want: MoEConfig | None = None) -> None:
    """Put ``moe``'s router, experts and shared experts into ``block`` (a plain dsv3.MoE's
    fused shared experts checked against ``want``, the block's config)."""
    _set_attr(getattr(block, arch.gate), arch.gate_weight, moe.router.weight)
    block.experts.gate_up_proj, block.experts.down_proj = moe.gate_up_proj, moe.down_proj
    if arch.gated_shared:
        if getattr(moe, "shared_expert", None) is None:
            raise ValueError(f"moe: {arch.name} needs a gated shared expert, which only a "
                             f"dsv3.MoE made by from_module carries")
        block.shared_expert, block.shared_expert_gate = moe.shared_expert, moe.shared_expert_gate
    elif _shared_module(arch, block) is not None:  # none: want.n_shared_experts == 0
        if isinstance(moe.shared_experts, SwiGLUMLP):
            _check_fused_shared(arch, moe.shared_experts, getattr(block, arch.shared[0]), want)
            _split_fused_shared(moe.shared_experts, getattr(block, arch.shared[0]))
        elif moe.shared_experts is not None:
            setattr(block, arch.shared[0], moe.shared_experts)
        else:
            raise ValueError(f"moe: {arch.name} needs shared experts, moe has none")
