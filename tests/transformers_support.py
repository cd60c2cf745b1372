"""Helpers the transformers integration tests share (test_transformers_integration.py,
test_transformers_modes.py): a per-architecture pytest parameter that skips where this
transformers lacks the family, a recorder of the dsv3:: ops a forward ran, and the
configs of plain dsv3.MoE blocks that to_module turns into each family's HF block.
The tiny HF models themselves are in hf_models.py."""
import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from hf_models import GLM5_NEXT_SWIGLU_LIMIT, GRANITE, LAGUNA_ROUTED_SCALE, missing


def arch_param(arch: str, *values, marks=(), why=missing):
    """One arch's parameter set; skipped where this transformers lacks the family (or
    where ``why``, given the arch, gives another reason)."""
    reason = why(arch)
    skip = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(arch, *values, marks=[*marks, *skip])


class DsvOpLog(TorchDispatchMode):
    """Records which dsv3:: ops ran, so a test fails if a route silently fell back
    to transformers' own code (the logits would still match)."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "dsv3":
            self.ops.add(func._opname)
        return func(*args, **(kwargs or {}))


# bias_update_rate gives a dsv3.MoE its expert_bias buffer.
DEEPSEEK_V3_LIKE = dict(ffn_dim=24, n_experts=8, top_k=3, n_shared_experts=1, score="sigmoid",
                        n_groups=4, topk_groups=2, route_scale=2.5, bias_update_rate=1e-3)
PLAIN_CONFIGS = {
    "mixtral": dict(ffn_dim=48, n_experts=4, top_k=2),
    "deepseek_v3": dict(ffn_dim=24, n_experts=8, top_k=3, n_shared_experts=1, score="sigmoid",
                        n_groups=4, topk_groups=2, route_scale=2.5, bias_update_rate=1e-3),
    "hunyuan_v1_moe": dict(ffn_dim=24, n_experts=6, top_k=2, n_shared_experts=1),
    "afmoe": dict(ffn_dim=24, n_experts=6, top_k=2, n_shared_experts=2, score="sigmoid",
                  route_scale=2.0, bias_update_rate=1e-3),
    # Vision-language models: their whole config (its text_config picks the block).
    "qwen3_vl_moe": dict(ffn_dim=24, n_experts=6, top_k=2),
    "glm4v_moe": dict(ffn_dim=24, n_experts=8, top_k=3, n_shared_experts=1, score="sigmoid",
                      n_groups=4, topk_groups=2, route_scale=2.5, bias_update_rate=1e-3),
    "deepseek_v2": dict(ffn_dim=24, n_experts=8, top_k=3, n_shared_experts=2, route_scale=1.5,
                        normalize_weights=False),
    # group_limited_greedy: groups scored by their best expert.
    "deepseek_v2_group_limited": dict(ffn_dim=24, n_experts=8, top_k=3, n_shared_experts=2,
                                      route_scale=1.5, normalize_weights=False, n_groups=4,
                                      topk_groups=2, group_score="max"),
    "cohere2_moe": dict(ffn_dim=24, n_experts=6, top_k=2, n_shared_experts=2),
    # The clamped SwiGLU, in the routed and the (split) shared experts alike.
    "glm5_next": dict(ffn_dim=24, n_experts=8, top_k=3, n_shared_experts=1, score="sigmoid",
                      n_groups=4, topk_groups=2, route_scale=2.5, bias_update_rate=1e-3,
                      swiglu_limit=GLM5_NEXT_SWIGLU_LIMIT),
    # Softmax chosen with a bias, renormalized; 2 shared experts, or none.
    "ernie4_5_moe": dict(ffn_dim=24, n_experts=6, top_k=2, n_shared_experts=2,
                         bias_update_rate=1e-3),
    "ernie4_5_moe_no_shared": dict(ffn_dim=24, n_experts=6, top_k=2, bias_update_rate=1e-3),
    # Qwen3-Omni-MoE: the thinker's config (its text_config picks the block).
    "qwen3_omni_moe_thinker": dict(ffn_dim=24, n_experts=6, top_k=2, normalize_weights=False),
    "jamba": dict(ffn_dim=24, n_experts=6, top_k=2, normalize_weights=False),
    "kimi_linear": DEEPSEEK_V3_LIKE,
    "bailing_hybrid": DEEPSEEK_V3_LIKE,
    "mimo_v2_flash": dict(ffn_dim=24, n_experts=8, top_k=3, score="sigmoid", n_groups=4,
                          topk_groups=2, route_scale=2.5, normalize_weights=False,
                          bias_update_rate=1e-3),
    "hy_v3": dict(ffn_dim=24, n_experts=6, top_k=2, n_shared_experts=2, score="sigmoid",
                  route_scale=2.5, bias_update_rate=1e-3),
    # Softmax, groups by their top-2 sum.
    "mistral4": dict(ffn_dim=24, n_experts=8, top_k=3, n_shared_experts=1, n_groups=4,
                     topk_groups=2, route_scale=1.5, normalize_weights=False),
    **{arch: dict(ffn_dim=24, n_experts=6, top_k=2) for arch in GRANITE},
    # The routed scale is the block's (moe_routed_scaling_factor).
    "laguna": dict(ffn_dim=24, n_experts=6, top_k=2, n_shared_experts=2, score="sigmoid",
                   route_scale=LAGUNA_ROUTED_SCALE, bias_update_rate=1e-3),
    "axk2": dict(ffn_dim=24, n_experts=6, top_k=2, n_shared_experts=1, score="sigmoid",
                 route_scale=2.5, bias_update_rate=1e-3),
    "mellum": dict(ffn_dim=24, n_experts=6, top_k=2, normalize_weights=False),
    "flint": dict(ffn_dim=24, n_experts=6, top_k=2, n_shared_experts=2, score="sigmoid"),
    "lara_mini": dict(ffn_dim=24, n_experts=6, top_k=2, n_shared_experts=2,
                      normalize_weights=False),
    # Mistral-Large-4: the whole model's config (its text_config picks the block); always
    # renormalized.
    "mistral_large4": dict(ffn_dim=24, n_experts=8, top_k=3, n_shared_experts=1, n_groups=4,
                           topk_groups=2, route_scale=1.5),
    # One shared MLP of 2x the experts' width: 2 shared experts.
    "dots3_note": {**DEEPSEEK_V3_LIKE, "n_shared_experts": 2},
}
