"""``experts_implementation="dsv3"``: transformers' experts modules on dsv3's kernels.

transformers (v5) routes every experts module decorated with
``@use_experts_implementation`` through ``ExpertsInterface``, a registry of forward
functions keyed by name. Registering ours there swaps only the expert computation
(expert index, grouped GEMMs with the permute fused into the first, SwiGLU,
weighted unpermute); the model's own router still
picks the experts, so this path works for any such model whose experts are plain
SwiGLU, or the clamped SwiGLU of the classes in ``CLAMPED_SWIGLU_EXPERTS`` (GLM-5-Next's,
DeepSeek-V4's, HunYuan-V4's and HunYuan-V4-VL's), or
GPT-OSS's (biased, interleaved, its own activation: gpt_oss.py), at the cost
of leaving routing unfused (``patch_moe`` fuses it too).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations import moe as hf_moe

from dsv3.integrations.transformers import gpt_oss
from dsv3.moe import autocast_compute_dtype, routed_experts

NAME = "dsv3"

# Experts classes whose _apply_gate is the clamped SwiGLU that ops.swiglu computes with a
# limit L: gate = gate.clamp(max=L); up = up.clamp(-L, L); silu(gate) * up, read line by
# line. Matched by exact class (module and name), never by isinstance: a subclass may
# gate otherwise. Per class: the attribute holding L, and whether silu is written into
# _apply_gate (GLM-5-Next, HunYuan-V4 and -VL: F.silu) rather than taken from act_fn
# (DeepSeek-V4: ACT2FN[hidden_act], checked to be SiLU as for the default gate).
CLAMPED_SWIGLU_EXPERTS = {
    ("transformers.models.glm5_next.modeling_glm5_next", "Glm5NextTextExperts"):
        ("swiglu_limit", True),
    ("transformers.models.deepseek_v4.modeling_deepseek_v4", "DeepseekV4Experts"):
        ("limit", False),
    ("transformers.models.hy_v4.modeling_hy_v4", "HYV4Experts"): ("swiglu_limit", True),
    ("transformers.models.hy_v4_vl.modeling_hy_v4_vl", "HYV4VLExperts"): ("swiglu_limit", True),
}


def _clamped(experts: nn.Module) -> tuple[str, bool] | None:
    return _clamped_class(type(experts))


# Under torch.compile this class check runs once, at trace time, and its result is a
# constant of the graph: dynamo does not trace a function's __qualname__ faithfully (it
# compared unequal, so compiled models refused GLM-5-Next's and DeepSeek-V4's experts).
# Only the class check: the limit itself is read where it is used, so that dynamo
# guards on it and a changed limit recompiles instead of being ignored. It takes the
# class, not the module: torch 2.11's dynamo cannot pass a module to such a function
# ("UnspecializedNNModuleVariable is not a constant").
@torch.compiler.assume_constant_result
def _clamped_class(cls: type) -> tuple[str, bool] | None:
    known = CLAMPED_SWIGLU_EXPERTS.get((cls.__module__, cls.__name__))
    gate = cls._apply_gate
    if known is None or (gate.__module__, gate.__qualname__) != (cls.__module__,
                                                                 f"{cls.__name__}._apply_gate"):
        return None  # unknown, or its _apply_gate replaced since the table was read
    return known


def swiglu_limit(experts: nn.Module) -> float | None:
    """The clamp limit of ``experts``' SwiGLU (a known clamped class), else None."""
    clamped = _clamped(experts)
    return None if clamped is None else getattr(experts, clamped[0], None)


def unsupported_reason(experts: nn.Module) -> str | None:
    """Why ``experts`` cannot run on dsv3's kernels, or None if it can."""
    if gpt_oss.is_gpt_oss_experts(experts):
        return gpt_oss.experts_unsupported_reason(experts)
    if "_apply_gate" in experts.__dict__:  # the class checks below would not see it
        return "its gating function (_apply_gate) is replaced on the instance"
    if not getattr(experts, "has_gate", False):
        return "its experts have no gate (dsv3 runs SwiGLU experts only)"
    if getattr(experts, "has_bias", False):
        return "its expert projections have biases"
    if not getattr(experts, "is_concatenated", True):
        return "its gate and up rows are interleaved, not concatenated [gate; up]"
    if getattr(experts, "has_post_expert_norm", False):
        return "it normalizes each expert's output"
    if getattr(experts, "_is_expert_parallel", False):
        return "it is sharded for expert parallelism"
    clamped = _clamped(experts)
    if clamped is not None:
        attr, silu_written_in = clamped
        limit = getattr(experts, attr, None)
        # limit != limit (NaN) and abs(): math.isfinite breaks torch.compile's graph.
        if (isinstance(limit, bool) or not isinstance(limit, (int, float))
                or limit != limit or abs(limit) == math.inf or limit <= 0):
            return f"its SwiGLU clamp limit ({attr}={limit!r}) is not a finite number > 0"
        if silu_written_in:
            return None
    elif type(experts)._apply_gate is not hf_moe._default_apply_gate:
        return "it overrides the gating function (_apply_gate) with one dsv3 does not know"
    act_fn = getattr(experts, "act_fn", None)
    # A module (ACT2FN's) or the function itself (LFM2-MoE's act_fn is F.silu).
    if not (isinstance(act_fn, (nn.SiLU, SiLUActivation)) or act_fn is F.silu):
        name = getattr(act_fn, "__name__", type(act_fn).__name__)
        return f"its activation is {name}, not SiLU"
    return None


def dsv3_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """Drop-in for an experts module's forward: y_TD = sum_k w_TK * expert_k(x_TD)."""
    reason = unsupported_reason(self)
    if reason is not None:
        raise NotImplementedError(
            f'experts_implementation="{NAME}" cannot run {type(self).__name__}: {reason}; '
            f'use experts_implementation="grouped_mm" for this model')
    # Under autocast the HF loop's F.linear calls run in the autocast dtype; the custom
    # ops get none of their own, so the operands are cast here as autocast would (a
    # differentiable cast of the stored weights). Without it fp32 activations met bf16
    # weights in the grouped GEMM and were refused there.
    compute_dtype = autocast_compute_dtype(hidden_states.device.type, self.gate_up_proj.dtype)
    x_TD = hidden_states if compute_dtype is None else hidden_states.to(compute_dtype)
    experts_TK = top_k_index.to(torch.int32)  # the routers hand out int64 ids
    if gpt_oss.is_gpt_oss_experts(self):
        y_TD = gpt_oss.experts_forward(self, x_TD, experts_TK, top_k_weights)
    else:
        # Weights as [in, out] per expert: views of either stored layout, never copies.
        if self.is_transposed:  # stored [E, D, 2F] / [E, F, D]
            gate_up_ED2F, down_EFD = self.gate_up_proj, self.down_proj
        else:  # nn.Linear's [out, in]: [E, 2F, D] / [E, D, F]
            gate_up_ED2F = self.gate_up_proj.transpose(1, 2)
            down_EFD = self.down_proj.transpose(1, 2)
        if compute_dtype is not None:
            gate_up_ED2F, down_EFD = gate_up_ED2F.to(compute_dtype), down_EFD.to(compute_dtype)
        # Routing weights may be fp32 or the model dtype (Qwen casts them down): unpermute
        # accumulates in fp32 either way.
        y_TD = routed_experts(x_TD, experts_TK, top_k_weights, gate_up_ED2F, down_EFD,
                              swiglu_limit(self))
    # The HF loop accumulates into zeros_like(hidden_states): its dtype, under autocast too.
    return y_TD.to(hidden_states.dtype)


def register() -> None:
    """Add "dsv3" to transformers' class-wide experts registry. Both
    ``from_pretrained(..., experts_implementation="dsv3")`` and
    ``model.set_experts_implementation("dsv3")`` validate names against it."""
    hf_moe.ExpertsInterface.register(NAME, dsv3_experts_forward)
