"""``patch_moe`` / ``unpatch_moe``: swap every supported sparse MoE block of a model
for a dsv3.MoE on the same Parameters, and back.

A patched model's state_dict has the unpatched model's keys (``mlp.experts.gate_up_proj``,
``mlp.gate.weight``, ...; see block.py), so ``save_pretrained`` (which HF's Trainer
calls itself) writes the checkpoint the unpatched model would, which transformers
loads as usual (patch the loaded model again), and an HF state_dict loads into a
patched model. GPT-OSS's replacement (gpt_oss.GptOssMoE) keeps the HF router and
experts modules, so it keeps the keys as they are.
"""
from torch import nn

from dsv3.integrations.transformers import gpt_oss
from dsv3.integrations.transformers.architectures import architecture_of, supported
from dsv3.integrations.transformers.block import TransformersMoE
from dsv3.integrations.transformers.converters import from_module, to_module
from dsv3.integrations.transformers.wrappers import (adapter_wrapped, offloads_children,
                                                     remember_model)

PATCHED = (TransformersMoE, gpt_oss.GptOssMoE)


def _patchable(module: nn.Module) -> bool:
    return architecture_of(module) is not None or gpt_oss.matches(module)


def _replace(model: nn.Module, select, convert, op: str) -> int:
    """All or nothing: every selected child is converted before any is replaced, so a
    refused block (convert raises) leaves the model as it was. A refusal names the
    block's path in the model ("patch_moe: model.layers.3.mlp: ..."), which a model
    whose layers differ (per-layer settings) needs to be told."""
    targets = [(parent, name, child, f"{path}.{name}" if path else name)
               for path, parent in model.named_modules()
               for name, child in parent.named_children() if select(child)]
    converted = []
    for _, _, child, path in targets:
        try:
            converted.append(convert(child))
        except (TypeError, ValueError) as error:
            message = f"{op}: {path}: {str(error).removeprefix('block: ')}"
            try:  # its own class (WrongType is a TypeError and a ValueError both) ...
                renamed = type(error)(message)
            except Exception:  # ... unless its constructor wants other arguments
                renamed = (TypeError if isinstance(error, TypeError) else ValueError)(message)
            raise renamed from error
    targets = [target[:3] for target in targets]
    for (parent, name, _), new in zip(targets, converted, strict=True):
        setattr(parent, name, new)
    return len(targets)


def patch_moe(model: nn.Module) -> int:
    """Replace each supported sparse MoE block in ``model`` (in place) by a dsv3.MoE that
    fuses its routing and experts (GPT-OSS's by a gpt_oss.GptOssMoE, which does the same
    for its biased experts); returns how many were replaced. Dense MLPs (e.g.
    DeepSeek-V3's first_k_dense_replace layers) stay as they are. Patching a model twice
    replaces nothing the second time and returns 0.

    A block of a supported architecture that dsv3.MoE cannot compute (a refused mode,
    e.g. Cohere2-MoE's expert_selection_fn="sigmoid", or experts other than plain
    SwiGLU) is a ValueError saying why, and nothing is replaced: the model stays whole
    rather than silently half (or not) patched. A model with no block of a supported
    architecture at all is a TypeError."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_moe: model must be a torch.nn.Module, got {type(model).__name__}")
    if _patchable(model):  # in place needs a parent to put the new block in
        raise TypeError(f"patch_moe: model is itself a {type(model).__name__}; convert a lone "
                        f"block with from_module(block)")
    _refuse_offloading_ancestors(model)
    count = _replace(model, _patchable, from_module, "patch_moe")
    for module in model.modules():
        if isinstance(module, PATCHED):
            remember_model(module, model)  # an offload refused later takes back its hooks
    if count == 0 and not any(isinstance(m, PATCHED) for m in model.modules()):
        raise TypeError(f"patch_moe: model ({type(model).__name__}) has no sparse MoE block "
                        f"dsv3 supports; supported architectures: {supported()}")
    return count


def unpatch_moe(model: nn.Module) -> int:
    """Undo patch_moe (in place): each TransformersMoE (or GptOssMoE) goes back to the
    transformers block it replaced, on the same Parameters. Returns how many were restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch_moe: model must be a torch.nn.Module, got {type(model).__name__}")
    _refuse_wrapped_blocks(model)
    return _replace(model, lambda m: isinstance(m, PATCHED), to_module, "unpatch_moe")


def _refuse_offloading_ancestors(model: nn.Module) -> None:
    """A ValueError if accelerate offloads a supported block's tensors from a hook on a
    module above it (preload_module_classes): that hook loads them by the names they
    have now, which patching changes. (Hooks on the block's own parts are refused by
    from_module.)"""
    for path, module in model.named_modules():
        if offloads_children(module) and any(_patchable(m) for m in module.modules()):
            raise ValueError(f"patch_moe: accelerate offloads the weights under "
                             f"{path or type(model).__name__} (cpu_offload, disk_offload or a "
                             f"device_map with 'cpu' or 'disk'), MoE blocks included: a patched "
                             f"block could not load them. Patch a model whose MoE blocks are "
                             f"in memory, or run this one unpatched")


def _refuse_wrapped_blocks(model: nn.Module) -> None:
    """A ValueError if an adapter wraps a patched block itself (PEFT's target_parameters
    on its own gate_up_proj / down_proj): the HF block holds those Parameters in its
    experts module, so the wrapper, left around the HF block, would look for them there
    in vain."""
    for path, module in model.named_modules():
        if adapter_wrapped(module) and isinstance(module._modules["base_layer"], PATCHED):
            raise ValueError(f"unpatch_moe: the patched block {path}.base_layer is wrapped by "
                             f"{type(module).__name__} (an adapter on its own Parameters), which "
                             f"cannot move into the HF block; merge_and_unload() (or unload()) "
                             f"the adapter first")
