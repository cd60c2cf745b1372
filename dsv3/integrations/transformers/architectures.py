"""What dsv3 needs to know about each transformers sparse MoE block it can replace.

All four keep their experts as transformers' fused 3D parameters, ``gate_up_proj``
[E, 2F, D] (gate rows first) and ``down_proj`` [E, D, F]: exactly dsv3.MoE's layout,
so the converters hand the very same Parameters over, no copy. What differs between
architectures is the router (read into MoEConfig here) and the shared expert:

| architecture | router                                                    | shared expert            |
|--------------|-----------------------------------------------------------|--------------------------|
| Mixtral      | softmax, top-k, renormalized                              | none                     |
| Qwen2-MoE    | softmax, top-k, renormalized iff norm_topk_prob           | one, behind sigmoid gate |
| Qwen3-MoE    | softmax, top-k, renormalized iff norm_topk_prob           | none                     |
| DeepSeek-V3  | sigmoid + correction bias, group-limited, scaled, norm opt | n_shared_experts, plain |

Blocks are matched by exact class (module and name), never by isinstance: a subclass
in another model may change the forward, and we would silently compute the wrong thing.
"""
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Architecture:
    name: str  # what error messages list
    model_type: str  # transformers' config.model_type
    module: str  # the modeling module holding the classes below
    block: str  # the sparse MoE block patch_moe replaces
    router: str  # its router class: the class transformers records router_logits from
    routing: Callable[[nn.Module], dict]  # MoEConfig routing fields, read from the router
    shared: tuple[str, ...] = ()  # HF submodules the patched block keeps as they are
    gated_shared: bool = False  # shared expert scaled by sigmoid(shared_expert_gate(x))

    def classes(self) -> tuple[type, type]:
        """(block class, router class), importing the modeling module."""
        module = importlib.import_module(self.module)
        return getattr(module, self.block), getattr(module, self.router)

    def matches(self, module: nn.Module) -> bool:
        cls = type(module)
        return cls.__module__ == self.module and cls.__name__ == self.block


def _softmax_routing(router: nn.Module) -> dict:
    # Mixtral's router has no norm_topk_prob: it always renormalizes.
    return {"score": "softmax", "normalize_weights": bool(getattr(router, "norm_topk_prob", True))}


def _deepseek_routing(router: nn.Module) -> dict:
    return {"score": "sigmoid", "n_groups": router.num_group, "topk_groups": router.topk_group,
            "route_scale": float(router.routed_scaling_factor),
            "normalize_weights": bool(router.norm_topk_prob)}


ARCHITECTURES = (
    Architecture("Mixtral", "mixtral", "transformers.models.mixtral.modeling_mixtral",
                 "MixtralSparseMoeBlock", "MixtralTopKRouter", _softmax_routing),
    Architecture("Qwen2-MoE", "qwen2_moe", "transformers.models.qwen2_moe.modeling_qwen2_moe",
                 "Qwen2MoeSparseMoeBlock", "Qwen2MoeTopKRouter", _softmax_routing,
                 shared=("shared_expert", "shared_expert_gate"), gated_shared=True),
    Architecture("Qwen3-MoE", "qwen3_moe", "transformers.models.qwen3_moe.modeling_qwen3_moe",
                 "Qwen3MoeSparseMoeBlock", "Qwen3MoeTopKRouter", _softmax_routing),
    Architecture("DeepSeek-V3", "deepseek_v3", "transformers.models.deepseek_v3.modeling_deepseek_v3",
                 "DeepseekV3MoE", "DeepseekV3TopkRouter", _deepseek_routing,
                 shared=("shared_experts",)),
)


def supported() -> str:
    """'Mixtral (MixtralSparseMoeBlock), ...' for error messages."""
    return ", ".join(f"{a.name} ({a.block})" for a in ARCHITECTURES)


def architecture_of(block: nn.Module) -> Architecture | None:
    return next((a for a in ARCHITECTURES if a.matches(block)), None)


def architecture_for(model_type: str) -> Architecture:
    for arch in ARCHITECTURES:
        if arch.model_type == model_type:
            return arch
    raise ValueError(f"hf_config: model_type {model_type!r} is not supported; supported "
                     f"architectures: {supported()}")
