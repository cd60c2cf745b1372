"""``TransformersMoE``: the dsv3.MoE that ``patch_moe`` puts where a transformers sparse
MoE block was.

It is a dsv3.MoE (fused routing and experts on dsv3's ops, same Parameters as the
block it replaces) plus the parts of the HF block that dsv3.MoE does not have:

- Qwen2-MoE's (and Qwen3-Next's, Qwen3.5-MoE's) gated shared expert,
  ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``, kept as the HF modules and added
  after the routed experts. Plain shared experts (DeepSeek-V3's and alike) go through
  dsv3.MoE's own shared-expert slot, again as the HF module: its gate and up projections
  are separate Linears, and fusing them would need a copy.
- router_logits for ``output_router_logits`` (the models' load-balancing aux loss).
  transformers records them with forward hooks on modules of the router class, so
  the block owns a tap: an instance of a subclass of that router class whose forward
  is the identity on logits. It is the submodule ``gate``, the name most HF blocks give
  their router, because some recorders also filter by module name (MiniMax's records
  only modules under "mlp.gate"). Only when a hook sits on it does the block compute
  the logits for it, once more, outside dsv3.MoE's fused router: a [T, D] x [D, E]
  matmul, small next to the experts. transformers adds its recorder hooks on the
  first forward asked for any recorded output (router_logits, or hidden states) and
  keeps them, so from then on every forward pays that matmul. The logits are fp32
  (dsv3 routes in fp32), where Mixtral and Qwen record them in the model dtype; in
  fp32 models they are the same.
- Mixtral's (and MiniMax's) router jitter (training only, off by default): the same
  draws as HF's from the same RNG state, applied out of place (HF scales the block's
  input in place). For Mixtral the result is the same. MiniMax's differs in training
  with jitter on: its decoder layer keeps the block's input tensor as the residual,
  which HF's in-place scaling jitters too (the jitter reaches the residual stream),
  where the patched block leaves it alone.
- HF stand-ins for transformers' weight init: ``gate`` (the tap above), ``experts`` and
  ``hf_block`` are instances of subclasses of the HF router, experts and block classes
  without parameters, whose missing attributes are read from a view of the HF block
  on this block's own tensors (``hf_view``). transformers' ``_init_weights`` picks its
  branch by class and reads the HF names (module.weight, module.gate_up_proj,
  module.e_score_correction_bias, ...), so ``model.init_weights()`` (e.g. after
  building on the meta device, patch_moe and to_empty) initializes every tensor of
  the patched block with the distribution the HF block's would get (the values
  differ: the draws come in another order).
- The HF block's state_dict names: a state_dict post-hook renames this block's entries
  (``router.weight`` -> ``gate.weight``, ``gate_up_proj`` -> ``experts.gate_up_proj``,
  ``expert_bias`` -> ``gate.e_score_correction_bias``, ``shared_experts.*`` ->
  ``shared_mlp.*``, ...) to the names, order and shapes of the block it replaced
  (``hf_keys``, from from_module), and loading renames them back (dsv3's names, as
  patched models saved them before, load too). So a patched model's state_dict, and
  save_pretrained's checkpoint, are the unpatched model's. named_parameters() keeps
  dsv3's names, in the HF block's order (``module_order``): optimizer states, keyed by
  position, move between patched and unpatched models.
- An adapter on the router (PEFT's LoRA: ``target_modules=["router"]``, or
  ``"all-linear"``, which on the unpatched model adapts the router's weight) or a hook
  on it takes part: dsv3.MoE then routes on the router's own forward.
- Refusals (wrappers.py): accelerate's offloading hooks, which act in forwards this
  block never calls, and patching a block whose HF router or experts an adapter wraps.

dsv3.MoE's own load-balance and z-losses are switched off (coef 0): the HF model
computes its aux loss from router_logits, as before the patch. The output is the
tensor the HF block returned, same shape and dtype (under autocast too). An input
with no tokens (e.g. shape [1, 0, D]) gives an empty output, as HF blocks do.
"""
import functools

import torch
from torch import nn

from dsv3.integrations.transformers.wrappers import refuse_offloading_hook
from dsv3.moe import MoE, MoEConfig


def _proxy_getattr(self, name: str):
    # nn.Module's own lookup first (hooks, flags); then what the HF module of ``part``
    # holds, read from a view of the owning block (see TransformersMoE.hf_view): so
    # transformers' _init_weights, which dispatches on the class and reads the HF
    # attribute names (module.weight, module.gate_up_proj, ...), initializes the
    # patched block's own tensors, in place.
    try:
        return nn.Module.__getattr__(self, name)
    except AttributeError:
        owner = self.__dict__.get("_owner")
        if owner is None or name.startswith("__"):
            raise
    try:
        view = owner.hf_view(self.__dict__["_part"])
    except Exception as exc:  # still an AttributeError: hasattr() callers expect one
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r} (its HF "
                             f"module could not be rebuilt: {exc})") from exc
    return getattr(view, name)


def _proxy_no_forward(self, *args, **kwargs):
    raise RuntimeError(f"{type(self).__name__} only stands for the HF module in transformers' "
                       f"weight init; the TransformersMoE holding it computes the block")


@functools.cache
def hf_proxy_class(hf_cls: type, part: str) -> type:
    """A subclass of ``hf_cls`` (the HF block's router, experts or block class, ``part``
    "router", "experts" or "block") with no parameters of its own, whose missing
    attributes are those of the HF module it stands for. The router's is also the logits
    tap: its forward returns its input."""

    def __init__(self, owner: "TransformersMoE | None" = None):
        nn.Module.__init__(self)  # not hf_cls.__init__: the proxy owns no weights
        # In __dict__, not as a submodule: the owner is this module's parent.
        self.__dict__["_owner"], self.__dict__["_part"] = owner, part

    def forward(self, logits_TE):
        return logits_TE

    def __reduce_ex__(self, protocol):
        # Pickle finds classes by module and name, and this one is made here, not
        # defined there: rebuild it from the HF class instead (torch.save(model)).
        return _new_proxy, (hf_cls, part), self.__getstate__()

    suffix = {"router": "LogitsTap", "experts": "InitProxy", "block": "InitProxy"}[part]
    return type(f"{hf_cls.__name__}{suffix}", (hf_cls,),
                {"__init__": __init__, "__getattr__": _proxy_getattr,
                 "forward": forward if part == "router" else _proxy_no_forward,
                 "__reduce_ex__": __reduce_ex__, "__module__": __name__,
                 "__doc__": f"Stands for the {hf_cls.__name__} of a dsv3 block that replaced "
                            f"it: for transformers' router_logits hooks and weight init."})


def _new_proxy(hf_cls: type, part: str) -> nn.Module:
    """An empty proxy for unpickling, which then restores its state."""
    proxy_class = hf_proxy_class(hf_cls, part)
    return proxy_class.__new__(proxy_class)


def _new_tap(router_cls: type) -> nn.Module:
    """Unpickles a logits tap saved before the proxies had a part."""
    proxy = _new_proxy(router_cls, "router")
    proxy.__dict__["_part"] = "router"
    return proxy


class TransformersMoE(MoE):
    """Build with ``from_module(hf_block)``: created on the meta device, then handed the
    block's own Parameters and modules."""

    layer_idx = None  # for instances pickled before it was kept
    hf_keys = ()  # likewise: before their state_dict took the HF block's names
    module_order = None  # likewise: before their parameters took the HF block's order
    input_name = "hidden_states"  # the HF block's argument, as errors name it

    def __init__(self, config: MoEConfig, *, architecture, hf_config, router_cls: type,
                 dtype: torch.dtype, jitter_noise: float = 0.0, layer_idx: int | None = None,
                 experts_cls: type | None = None, block_cls: type | None = None):
        super().__init__(config, device="meta", dtype=dtype)
        self.architecture = architecture
        self.hf_config = hf_config  # to rebuild the HF block in to_module
        self.layer_idx = layer_idx  # likewise: per-layer configs (HunYuan's list moe_topk)
        self.jitter_noise = jitter_noise
        self.gate = hf_proxy_class(router_cls, "router")(self)  # named for the recorders
        self.shared_expert = self.shared_expert_gate = None
        # Stand-ins that transformers' _init_weights recognizes by class (see the module
        # docstring); registered after the router, whose generic nn.Linear init the
        # router's own init then overrides, as in the HF block.
        if experts_cls is not None:
            self.experts = hf_proxy_class(experts_cls, "experts")(self)
        if block_cls is not None:
            self.hf_block = hf_proxy_class(block_cls, "block")(self)
        # (dsv3 name, HF name, HF shape, dsv3 shape) of each state_dict entry, in the HF
        # block's order: filled by from_module.
        self.hf_keys = ()
        self.register_state_dict_post_hook(_hf_state_dict)

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        """nn.Module's walk, with this block and its children in ``module_order`` (set by
        from_module): the order the HF block holds their Parameters in, so that
        ``model.parameters()`` lists a patched model's Parameters in the unpatched model's
        order. Optimizer state dicts (HF Trainer's optimizer.pt) are keyed by that
        position, not by name: in another order, a resume across patched and unpatched
        runs hands the Adam moments of the router to the experts (and fused AdamW on CPU
        reads past their end). Mixtral's block holds its router first, where a plain
        walk yields this module's own experts Parameters before any child's."""
        order = self.module_order
        if order is None:
            yield from super().named_modules(memo, prefix, remove_duplicate)
            return
        if memo is None:
            memo = set()
        if self in memo:
            return
        if remove_duplicate:
            memo.add(self)  # before any child, as nn.Module does: no cycle can revisit it
        rest = [name for name in self._modules if name not in order]  # added after from_module
        for name in [*order, *rest]:
            if name == "":
                yield prefix, self
                continue
            child = self._modules.get(name)
            if child is not None:
                child_prefix = f"{prefix}.{name}" if prefix else name
                yield from child.named_modules(memo, child_prefix, remove_duplicate)

    def hf_view(self, part: str = "block") -> nn.Module:
        """A transformers block (or its router, ``part="router"``, or experts,
        ``"experts"``) built anew on this block's current tensors: what the proxies read
        their attributes from. Not validated as to_module's result is, and not for
        running: the HF router_logits hooks stay here."""
        from dsv3.integrations.transformers.converters import hf_view  # it imports this
        block = hf_view(self)
        return {"block": block, "experts": block.experts,
                "router": getattr(block, self.architecture.gate)}[part]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The HF block's names (its checkpoints', this module's state_dict's) back to
        # this module's, before anything is loaded; state dicts with dsv3's names (saved
        # before the HF names were kept) load as they are.
        for name, hf_name, hf_shape, shape in self.hf_keys:
            if prefix + hf_name in state_dict and prefix + name not in state_dict:
                value = state_dict.pop(prefix + hf_name)
                if value.shape == hf_shape != shape:  # ERNIE's [1, E] bias, an [E] here
                    value = value.view(shape)
                state_dict[prefix + name] = value
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_routing_bias(self, bias_E: torch.Tensor) -> None:
        """Use ``bias_E`` (a fixed buffer, e.g. DeepSeek-V3's e_score_correction_bias) to
        choose experts. It stays a buffer of this module, shared with the HF router's,
        and is moved only by whoever moved it before (update_bias() does not: the
        config's bias_update_rate is 0)."""
        del self.expert_bias  # a plain None attribute when bias_update_rate is 0
        self.register_buffer("expert_bias", bias_E)
        # dsv3.MoE counts routed copies for update_bias() whenever a bias is present.
        self.register_buffer("pending_counts", torch.zeros_like(bias_E, dtype=torch.int64),
                             persistent=False)

    @property
    def _hf_hook(self):
        # accelerate's hook slot, a property so that attaching an offloading hook (which
        # this block could not honour, see wrappers.py) is refused as it happens, rather
        # than failing later in the hook with a KeyError. Read by hasattr() and
        # getattr(m, "_hf_hook", None): missing is an AttributeError.
        try:
            return self.__dict__["_hf_hook"]
        except KeyError:
            raise AttributeError("_hf_hook") from None

    @_hf_hook.setter
    def _hf_hook(self, hook) -> None:
        refuse_offloading_hook(self, hook)
        self.__dict__["_hf_hook"] = hook

    @_hf_hook.deleter
    def _hf_hook(self) -> None:
        try:
            del self.__dict__["_hf_hook"]
        except KeyError:
            raise AttributeError("_hf_hook") from None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Before the jitter and the logits tap, which would fail first on a wrong shape
        # naming neither the argument nor the size it needs.
        self.check_input(hidden_states)
        x = hidden_states
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        if self.gate._forward_hooks:  # transformers is recording router_logits
            # The router's logits as dsv3.MoE takes them (through an adapter on the
            # router too, PEFT's LoRA), in fp32.
            self.gate(self.logits_for(x.reshape(-1, self.config.dim), torch.float32))
        # Under autocast dsv3.MoE returns the autocast dtype; the HF block returns its
        # input's (it accumulates the experts' outputs into a tensor of that dtype).
        y = self.checked_forward(x).to(hidden_states.dtype)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y


def _hf_state_dict(module: TransformersMoE, state_dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: the block's entries under the HF block's names, in its order,
    so that a patched model's state_dict (and save_pretrained's checkpoint) is the
    unpatched model's."""
    mine = {key: state_dict.pop(prefix + key) for key, _, _, _ in module.hf_keys
            if prefix + key in state_dict}
    # Entries with no HF counterpart (none in the listed architectures) follow, as named.
    rest = {key: state_dict.pop(key) for key in [k for k in state_dict if k.startswith(prefix)]}
    for key, hf_key, hf_shape, _ in module.hf_keys:
        if key in mine:
            value = mine[key]  # ERNIE's bias: the [E] view back to its [1, E]
            state_dict[prefix + hf_key] = value if value.shape == hf_shape else value.view(hf_shape)
    state_dict.update(rest)


def hf_module_order(block: TransformersMoE) -> tuple[str, ...] | None:
    """The order (``""`` for the block itself, else a child's name) in which to walk
    ``block`` so that its Parameters come in the order of the HF block's (its
    ``hf_keys``, in the HF state_dict's order, whose Parameters come in the
    named_parameters order); None where nn.Module's own walk gives that order already."""
    owner = {name: name.partition(".")[0] if "." in name else ""
             for name, _ in block.named_parameters()}
    order = []
    for name, _, _, _ in block.hf_keys:
        unit = owner.get(name)  # None: a buffer
        if unit is not None and unit not in order:
            order.append(unit)
    plain = [unit for unit in ["", *block._modules] if unit in order]
    if order == plain:
        return None
    return (*order, *[unit for unit in ["", *block._modules] if unit not in order])
