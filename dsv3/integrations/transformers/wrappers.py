"""Other libraries' wrappers and hooks that a patched block cannot honour, found so
that patch_moe, unpatch_moe and the patched block refuse them with the reason instead
of computing something else.

A patched block (block.TransformersMoE) reads its router's and experts' Parameters
itself, in its fused routing and experts ops, without calling those modules. So:

- PEFT's adapter layers (LoRA on the router, ``target_modules``, or on the experts'
  fused Parameters, ``target_parameters``) wrap a module and act in its forward, which
  never runs: the adapter would be silently left out of the output and get no
  gradient. (An adapter on the patched block's own Parameters, ``target_parameters=
  ["gate_up_proj", "down_proj"]``, wraps the block itself and does act, as does one on
  its router, ``target_modules=["router"]``: the block then calls the router.)
- accelerate's offloading hooks (cpu_offload, disk_offload, a device_map with "cpu"
  or "disk") keep a module's tensors on the meta device and load them in that
  module's forward, which never runs; and they look the tensors up in the state_dict
  by the module's own names, where a patched block's state_dict has the HF block's.

Both libraries are recognized by duck typing (neither is a dependency of dsv3).
"""
import weakref

from torch import nn

# The model each patched block was patched in (patch_moe): accelerate attaches its hooks
# module by module, so by the time it reaches a patched block it has offloaded the
# modules before it; a refusal takes those hooks back too. Weak, and kept here rather
# than on the block, so that a block neither keeps its model alive nor fails to pickle.
_PATCHED_IN: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
# The hooks the model's modules already had when it was patched (a user's own offload
# of, say, the embeddings): a refusal leaves those in place and takes back only the
# ones attached since.
_HOOKS_AT_PATCH: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()


def remember_model(block: nn.Module, model: nn.Module) -> None:
    """Record that ``block`` was patched into ``model``, and the hooks ``model``'s
    modules carry now."""
    _PATCHED_IN[block] = weakref.ref(model)
    for module in model.modules():
        hook = module.__dict__.get("_hf_hook")
        if hook is not None:
            _HOOKS_AT_PATCH[module] = hook


def adapter_wrapped(module: nn.Module | None) -> bool:
    """Whether ``module`` is an adapter layer around another module: PEFT's tuner layers
    (lora.Linear, lora.ParamWrapper, ...) hold the module they wrap as ``base_layer``."""
    return module is not None and isinstance(module._modules.get("base_layer"), nn.Module)


def offloading(hook) -> bool:
    """Whether ``hook`` (a module's accelerate ``_hf_hook``, possibly a SequentialHook
    of several) moves the module's tensors to the meta device between forwards."""
    return any(getattr(h, "offload", False) is True for h in getattr(hook, "hooks", (hook,)))


def offloaded(module: nn.Module) -> bool:
    """Whether accelerate offloads ``module``'s own tensors (or, with place_submodules,
    its children's too)."""
    return offloading(module.__dict__.get("_hf_hook"))


def offloads_children(module: nn.Module) -> bool:
    """Whether accelerate offloads ``module``'s children's tensors from a hook on
    ``module`` (preload_module_classes gives a decoder layer such a hook)."""
    hook = module.__dict__.get("_hf_hook")
    return any(getattr(h, "offload", False) is True and getattr(h, "place_submodules", False)
               for h in getattr(hook, "hooks", (hook,)))


def refuse_foreign(block: nn.Module, parts: dict[str, nn.Module | None], arg: str) -> None:
    """A ValueError naming ``arg`` if a part of ``block`` (``parts``: the router, the
    experts, by name) carries an adapter or an offloading hook that the patched block
    would bypass."""
    for name, part in parts.items():
        if adapter_wrapped(part):
            raise ValueError(
                f"{arg}: its {name} is wrapped by {type(part).__name__} (an adapter, e.g. "
                f"PEFT's LoRA), whose forward a patched block never calls: it reads the "
                f"{name}'s Parameters itself, so the adapter would be silently left out. "
                f"Patch the model before adding adapters, and put them on the patched "
                f"block's own modules and Parameters (target_modules=['router'], "
                f"target_parameters=['gate_up_proj', 'down_proj']) or outside the MoE "
                f"blocks")
    refuse_offloaded(block, parts, arg)


def refuse_offloaded(block: nn.Module, parts: dict[str, nn.Module | None], arg: str,
                     error: type = ValueError) -> None:
    """An ``error`` naming ``arg`` if accelerate offloads the weights of ``block`` or of
    one of its ``parts``: a patched block reads them without calling the module whose
    forward would load them."""
    for name, part in {"block": block, **parts}.items():
        if part is not None and offloaded(part):
            raise error(
                f"{arg}: accelerate offloads its {name}'s weights (cpu_offload, disk_offload "
                f"or a device_map with 'cpu' or 'disk'): they stay on the meta device until "
                f"that module's forward, which a patched block never calls. Patch a model "
                f"whose MoE blocks are in memory (a device_map of devices only), or run "
                f"this one unpatched")


def refuse_offloading_hook(block: nn.Module, hook) -> None:
    """Called as accelerate attaches ``hook`` to a patched ``block``: a RuntimeError if
    it offloads. Its init has already moved the block's own tensors to the meta device;
    they are put back first, from the hook's weights_map (under the HF names), so that
    the refused model still holds its weights."""
    if not offloading(hook):
        return
    for h in getattr(hook, "hooks", (hook,)):
        weights = getattr(h, "weights_map", None)
        if getattr(h, "offload", False) and weights is not None:
            _restore(block, weights)
    model = _PATCHED_IN.get(block, lambda: None)()
    if model is not None:
        _detach_offloading_hooks(model)
    raise RuntimeError(
        f"accelerate is offloading a patched dsv3 block ({type(block).__name__}): its "
        f"weights would stay on the meta device, looked up by dsv3's names in a state_dict "
        f"that has the HF block's, and its router's forward, which would load the router, "
        f"never runs. Offload the model before patch_moe is refused too; keep the MoE "
        f"blocks in memory (a device_map of devices only), or unpatch_moe the model "
        f"before offloading it")


def _detach_offloading_hooks(model: nn.Module) -> None:
    """Takes back the offloading hooks accelerate attached to ``model``'s modules before
    it reached the refused block: left, they kept those modules' weights on the meta
    device (state_dict and save_pretrained then failed). Only offloading hooks, and
    only those attached since patch_moe: a hook a module had then (the user's own) is
    left alone. accelerate's own removal puts the weights back."""
    from accelerate.hooks import remove_hook_from_module  # accelerate is the caller here
    for module in model.modules():
        hook = module.__dict__.get("_hf_hook")
        if offloading(hook) and _HOOKS_AT_PATCH.get(module) is not hook:
            remove_hook_from_module(module)


def _restore(block: nn.Module, weights) -> None:
    """Put ``block``'s tensors (its own and its children's) that an offloading hook moved
    to the meta device back from ``weights`` (the hook's map, keyed by the block's
    state_dict names, the HF block's: ``block.hf_keys`` pairs them with dsv3's)."""
    for name, hf_name, _, shape in block.hf_keys:
        # A dotted name is a child's tensor (the router's weight, a shared expert's):
        # a hook that places submodules (preload_module_classes) offloaded those too.
        path, _, leaf = name.rpartition(".")
        owner = block.get_submodule(path) if path else block
        for table in (owner._parameters, owner._buffers):
            tensor = table.get(leaf)
            if tensor is None or not tensor.is_meta:
                continue
            try:
                value = weights[hf_name].view(shape)
            except KeyError:
                continue  # not offloaded: nothing to put back
            if isinstance(tensor, nn.Parameter):
                value = nn.Parameter(value, requires_grad=tensor.requires_grad)
            table[leaf] = value
