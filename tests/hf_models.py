"""Tiny random transformers MoE models for the integration tests: built from configs,
never downloaded. Two decoder layers, D=32, vocab 100, fp32; per architecture the
routing features worth covering are switched on (see the comments)."""
import torch
import transformers

COMMON = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


def tiny_config(arch: str, **overrides):
    config = _config(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _config(arch: str):
    if arch == "mixtral":  # softmax top-2 of 4, renormalized
        return transformers.MixtralConfig(intermediate_size=48, num_local_experts=4,
                                          num_experts_per_tok=2, **COMMON)
    if arch == "qwen2_moe":  # no renormalization; gated shared expert of another width
        return transformers.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=24,
                                           shared_expert_intermediate_size=40, num_experts=6,
                                           num_experts_per_tok=2, norm_topk_prob=False, **COMMON)
    if arch == "qwen3_moe":  # renormalized top-2 of 6
        return transformers.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=24,
                                           num_experts=6, num_experts_per_tok=2,
                                           norm_topk_prob=True, head_dim=8, **COMMON)
    if arch == "deepseek_v3":  # layer 0 dense; sigmoid, 2 of 4 groups, scale 2.5, 1 shared
        return transformers.DeepseekV3Config(
            intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8, n_group=4,
            topk_group=2, num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
            routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=16, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            **{**COMMON, "num_key_value_heads": 4})
    raise ValueError(f"arch: unknown {arch!r}")


# Sparse MoE blocks in each tiny model (DeepSeek-V3's first layer stays dense).
N_SPARSE = {"mixtral": 2, "qwen2_moe": 2, "qwen3_moe": 2, "deepseek_v3": 1}


def tiny_model(arch: str, experts_implementation: str = "eager", **overrides):
    """A fresh tiny model in train mode (dropout is 0 in these configs); ``overrides``
    set config fields."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        tiny_config(arch, **overrides), experts_implementation=experts_implementation)
    if arch == "deepseek_v3":
        # A non-zero correction bias, so that selecting with it (and weighting without
        # it) is exercised; big enough to change some choices.
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.copy_(0.1 * torch.randn_like(
                    module.e_score_correction_bias))
    return model.train()


def input_ids(batch: int = 2, seq: int = 9) -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (batch, seq),
                         generator=torch.Generator().manual_seed(1))
