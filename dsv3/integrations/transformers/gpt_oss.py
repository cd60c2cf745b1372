"""GPT-OSS's experts and MoE block (transformers' GptOssExperts, GptOssMLP) on dsv3's ops.

GPT-OSS's experts are not dsv3.MoE's: their projections carry biases, gate and up
columns are interleaved, the activation is gate.clamp(max=L) * sigmoid(alpha * gate) *
(up.clamp(-L, L) + 1), and the weights are stored [in, out] ([E, D, 2F], [E, F, D]).
Two ways in, as for the other families:

- ``experts_implementation="dsv3"`` (experts.py) runs ``gpt_oss_experts`` in place of
  transformers' experts forward, with the model's own router;
- ``patch_moe`` replaces each GptOssMLP with a ``GptOssMoE``, which fuses the router
  too. It keeps the HF ``router`` and ``experts`` modules themselves (its state_dict
  is the HF block's, key for key: a patched model saves and loads as before):

    logits (fp32) -> route (softmax, top-k, renormalized) -> grouped GEMM with the
    permute fused in (+ gate_up bias) -> gpt_oss_glu -> grouped GEMM (+ down bias)
    -> weighted unpermute

The router: HF takes the softmax of the top-k logits, which is the renormalized
top-k softmax dsv3 computes. dsv3 routes on fp32 logits where HF uses the model
dtype (in bf16, near ties may choose differently). The block returns
(hidden_states, routing weights [T, K]) as GptOssMLP does, in its dtypes (under
autocast: the input's and the autocast dtype), and zeros for no tokens.
router_logits for ``output_router_logits`` are recorded by transformers' hooks on the
router module: only when a forward hook sits on it does the block call the HF router
once more, for them. Otherwise it calls neither module, reading their Parameters:
other hooks on them (a forward pre-hook; FSDP2's fully_shard of the experts module
alone) do not run.
"""
import torch
import torch.nn.functional as F
from torch import nn

from dsv3 import ops
from dsv3.integrations.transformers.wrappers import (adapter_wrapped, refuse_foreign,
                                                     refuse_offloaded)
from dsv3.moe import autocast_compute_dtype
from dsv3.ops.permute import unpermute_from_expert_index

MODULE = "transformers.models.gpt_oss.modeling_gpt_oss"
BLOCK, ROUTER, EXPERTS = "GptOssMLP", "GptOssTopKRouter", "GptOssExperts"


def _is(module: nn.Module, name: str) -> bool:
    """Exact class match (module and name), never isinstance: a subclass may compute
    something else."""
    return _class_is(type(module), name)


# Under torch.compile the class checks run once, at trace time (constants of the graph):
# dynamo does not trace a function's __qualname__ faithfully. They take classes, not
# modules: torch 2.11's dynamo cannot pass a module to such a function. What can change
# on an instance (a method set on it, alpha, the limit) is read where it is used, so
# dynamo guards on it and a change recompiles.
@torch.compiler.assume_constant_result
def _class_is(cls: type, name: str) -> bool:
    return cls.__module__ == MODULE and cls.__name__ == name


def matches(block: nn.Module) -> bool:
    return _is(block, BLOCK)


def _own(module: nn.Module, method: str) -> bool:
    """Whether ``module``'s ``method`` is its class's own, as read when this file was
    written (not replaced on the instance or the class since)."""
    if method in module.__dict__:  # set on the instance
        return False
    return _class_owns(type(module), method)


@torch.compiler.assume_constant_result
def _class_owns(cls: type, method: str) -> bool:
    func = getattr(cls, method, None)
    return (getattr(func, "__module__", None) == MODULE
            and getattr(func, "__qualname__", None) == f"{cls.__name__}.{method}")


def is_gpt_oss_experts(experts: nn.Module) -> bool:
    return _is(experts, EXPERTS)


def experts_unsupported_reason(experts: nn.Module) -> str | None:
    """Why ``experts`` (a GptOssExperts) cannot run on dsv3's ops, or None if it can."""
    if not is_gpt_oss_experts(experts) or not _own(experts, "_apply_gate"):
        return f"its experts are not transformers' {EXPERTS} with its own _apply_gate"
    for name, value in (("swiglu_alpha", experts.alpha), ("swiglu_limit", experts.limit)):
        if value is None and name == "swiglu_limit":
            continue  # no clamp
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
                or abs(value) == float("inf"):
            return f"its {name} ({value!r}) is not a finite number"
    if experts.limit is not None and experts.limit <= 0:
        return f"its swiglu_limit ({experts.limit!r}) is not > 0"
    if getattr(experts, "_is_expert_parallel", False):
        return "it is sharded for expert parallelism"
    return None


def unsupported_reason(block: nn.Module) -> str | None:
    """Why ``block`` (a GptOssMLP) cannot run on dsv3's ops, or None if it can."""
    router, experts = getattr(block, "router", None), getattr(block, "experts", None)
    if router is None or not _is(router, ROUTER) or not _own(router, "forward"):
        return f"its router is not transformers' {ROUTER}"
    if experts is None:
        return "it has no experts module"
    reason = experts_unsupported_reason(experts)
    if reason is None and router.top_k > experts.num_experts:
        reason = f"its top_k ({router.top_k}) is above its expert count ({experts.num_experts})"
    return reason


def experts_forward(experts: nn.Module, x_TD: torch.Tensor, experts_TK: torch.Tensor,
                    weights_TK: torch.Tensor) -> torch.Tensor:
    """GptOssExperts' function on dsv3's ops (its weights, biases, alpha and limit), in
    ``x_TD``'s dtype: under autocast the caller casts ``x_TD`` to the autocast dtype, and
    the weights and biases follow it here."""
    limit = experts.limit
    weights = (experts.gate_up_proj, experts.gate_up_proj_bias, experts.down_proj,
               experts.down_proj_bias)
    if autocast_compute_dtype(x_TD.device.type, experts.gate_up_proj.dtype) is not None:
        weights = tuple(w.to(x_TD.dtype) for w in weights)
    return gpt_oss_experts(x_TD, experts_TK, weights_TK, *weights,
                           float(experts.alpha), None if limit is None else float(limit))


def gpt_oss_experts(x_TD: torch.Tensor, experts_TK: torch.Tensor, weights_TK: torch.Tensor,
                    gate_up_ED2F: torch.Tensor, gate_up_bias_E2F: torch.Tensor,
                    down_EFD: torch.Tensor, down_bias_ED: torch.Tensor, alpha: float,
                    limit: float | None) -> torch.Tensor:
    """sum_k weights_TK[t, k] * expert_{experts_TK[t, k]}(x_TD[t]) for GPT-OSS experts
    (weights [in, out], biases, interleaved gate/up, ops.gpt_oss_glu)."""
    offsets_E, row_map_TK = ops.expert_index(experts_TK, gate_up_ED2F.shape[0])
    h_S2F = ops.add_expert_bias(ops.gather_grouped_mm(x_TD, gate_up_ED2F, offsets_E, row_map_TK),
                                gate_up_bias_E2F, offsets_E)
    y_SD = ops.add_expert_bias(ops.grouped_mm(ops.gpt_oss_glu(h_S2F, alpha, limit), down_EFD,
                                              offsets_E), down_bias_ED, offsets_E)
    return unpermute_from_expert_index(y_SD, row_map_TK, weights_TK)


def _refuse_adapters(parts: dict[str, nn.Module], arg: str, error: type = ValueError) -> None:
    """An ``error`` naming ``arg`` if an adapter wraps the router or the experts: the block
    reads their Parameters in its fused ops and never calls their forward, where the
    adapter acts, and its own Parameters are theirs (there is no other place to adapt)."""
    for name, part in parts.items():
        if adapter_wrapped(part):
            raise error(f"{arg}: its {name} is wrapped by {type(part).__name__} (an adapter, "
                        f"e.g. PEFT's LoRA), whose forward dsv3's GPT-OSS block never calls: "
                        f"the adapter would be silently left out. Adapters on GPT-OSS's router "
                        f"or experts need the model unpatched; adapters elsewhere (attention) "
                        f"work on a patched model")


class GptOssMoE(nn.Module):
    """Build with ``from_module(hf_block)``; ``to_module()`` gives the HF block back.
    Both share the ``router`` and ``experts`` modules (no copy)."""

    def __init__(self, router: nn.Module, experts: nn.Module):
        super().__init__()
        self.router, self.experts = router, experts

    @classmethod
    def from_module(cls, block: nn.Module, arg: str = "block") -> "GptOssMoE":
        _refuse_adapters({"router": block.router, "experts": block.experts}, arg)
        refuse_foreign(block, {"router": block.router, "experts": block.experts}, arg)
        reason = unsupported_reason(block)
        if reason is not None:
            raise ValueError(f"{arg}: this {type(block).__name__} cannot run on dsv3: {reason}")
        return cls(block.router, block.experts).train(block.training)

    def to_module(self) -> nn.Module:
        """The transformers GptOssMLP, holding this block's router and experts."""
        import importlib
        block_cls = getattr(importlib.import_module(MODULE), BLOCK)
        block = block_cls.__new__(block_cls)
        nn.Module.__init__(block)  # not GptOssMLP.__init__: it would allocate new weights
        block.router, block.experts = self.router, self.experts
        return block.train(self.training)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        router, experts = self.router, self.experts
        # An adapter added after patching (PEFT's target_parameters=["experts.gate_up_proj"])
        # wraps a module whose Parameters this block reads itself.
        _refuse_adapters({"router": router, "experts": experts}, type(self).__name__, TypeError)
        # Offloaded since patching (accelerate's cpu_offload of the patched model): the
        # hooks sit on the HF router and experts, whose forwards would load their weights
        # and never run; refused by name, where the meta weights failed deep in the ops.
        refuse_offloaded(self, {"router": router, "experts": experts}, type(self).__name__,
                         RuntimeError)
        dim = experts.hidden_size
        _check_hidden_states(hidden_states, dim, experts.gate_up_proj)
        x_TD = hidden_states.reshape(-1, dim)
        if router._forward_hooks:  # transformers is recording router_logits
            router(x_TD)
        device_type = x_TD.device.type
        dtype = autocast_compute_dtype(device_type, experts.gate_up_proj.dtype)
        if dtype is not None:
            # Cast as autocast would cast the HF loop's matmuls; experts_forward casts
            # the weights to match (differentiable casts from the fp32 weights).
            x_TD = x_TD.to(dtype)
        # GptOssMLP's dtypes: its output has the input's (its experts' loop accumulates
        # into zeros_like(hidden_states)), its routing weights the router logits' (the
        # autocast dtype under autocast).
        out_dtype, weights_dtype = hidden_states.dtype, x_TD.dtype
        if x_TD.shape[0] == 0:  # no tokens (ops.route refuses them); GptOssMLP gives zeros
            weights_TK = x_TD.new_zeros(0, router.top_k, dtype=weights_dtype)
            return hidden_states.new_zeros(hidden_states.shape), weights_TK
        # Routing on fp32 logits: in bf16 near-equal logits tie and flip expert choices.
        with torch.autocast(device_type, enabled=False):
            logits_TE = F.linear(x_TD.float(), router.weight.float(), router.bias.float())
        weights_TK, experts_TK, _ = ops.route(logits_TE, router.top_k, "softmax")
        y_TD = experts_forward(experts, x_TD, experts_TK, weights_TK)
        return y_TD.view(hidden_states.shape).to(out_dtype), weights_TK.to(weights_dtype)


def _check_hidden_states(hidden_states, dim: int, gate_up: torch.Tensor) -> None:
    """What GptOssMLP would refuse, refused naming ``hidden_states``: a last dim other
    than hidden_size (reshape(-1, D) would split each row into several tokens when it is
    a multiple of D, and compute garbage silently), another device, and outside autocast
    a dtype other than the experts' weights' (the grouped GEMM's error would blame its
    weights)."""
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"GptOssMoE: hidden_states must be a torch.Tensor, got "
                        f"{type(hidden_states).__name__}")
    if hidden_states.dim() < 1 or hidden_states.shape[-1] != dim:
        raise ValueError(f"GptOssMoE: hidden_states must have shape [..., hidden_size={dim}], "
                         f"got {tuple(hidden_states.shape)}")
    if hidden_states.device != gate_up.device:
        raise ValueError(f"GptOssMoE: hidden_states must be on the experts' device "
                         f"{gate_up.device}, got {hidden_states.device}")
    if (hidden_states.dtype != gate_up.dtype
            and not torch.is_autocast_enabled(hidden_states.device.type)):
        raise TypeError(f"GptOssMoE: hidden_states must have the experts' dtype "
                        f"{gate_up.dtype} (outside autocast), got {hidden_states.dtype}")
