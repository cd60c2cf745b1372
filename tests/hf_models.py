"""Tiny random transformers MoE models for the integration tests: built from configs,
never downloaded. Two decoder layers, D=32, vocab 100, fp32; per architecture the
routing features worth covering are switched on (see the comments). The
vision-language models (Qwen3-VL-MoE, GLM-4V-MoE, GLM-5-Next, Mistral-Large-4,
HunYuan-V4-VL, and Qwen3-Omni-MoE's thinker, with a one-block audio tower too) are whole
conditional-generation models with a one-block vision tower, run on text only: their
blocks live in the language model (``decoder_layers``). Qwen3-Omni-MoE's talker is its
own model, run on token ids (TinyTalker)."""
import importlib

import torch
import transformers

COMMON = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
# For configs whose default token ids lie past the tiny vocabulary.
NO_TOKENS = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "minimax", "olmoe", "flex_olmo",
         "qwen3_next", "qwen3_5_moe_text", "hunyuan_v1_moe", "glm4_moe", "glm4_moe_lite", "dots1",
         "exaone_moe", "minimax_m2", "afmoe", "qwen3_vl_moe", "solar_open", "deepseek_v32",
         "glm_moe_dsa", "glm4v_moe", "deepseek_v2", "deepseek_v2_group_limited", "cohere2_moe",
         "glm5_next", "ernie4_5_moe", "ernie4_5_moe_no_shared", "qwen3_omni_moe_thinker",
         "jamba", "kimi_linear", "mimo_v2_flash", "hy_v3", "mistral4", "granitemoe",
         "granitemoeshared", "granitemoehybrid", "granitemoe_swa", "laguna", "mellum",
         "bailing_hybrid", "flint", "lara_mini", "axk2", "qwen3_omni_moe_talker", "qwen4_exp_text",
         "mistral_large4", "dots3_note", "hy_v4", "hy_v4_vl")
GRANITE = ("granitemoe", "granitemoeshared", "granitemoehybrid", "granitemoe_swa")
# Models whose blocks carry a selection-only bias, set non-zero in tiny_model.
_BIASED = ("deepseek_v3", "glm4_moe", "glm4_moe_lite", "dots1", "exaone_moe", "minimax_m2",
           "afmoe", "solar_open", "deepseek_v32", "glm_moe_dsa", "glm4v_moe", "glm5_next",
           "ernie4_5_moe", "ernie4_5_moe_no_shared", "kimi_linear", "mimo_v2_flash", "hy_v3",
           "laguna", "bailing_hybrid", "axk2", "dots3_note", "hy_v4", "hy_v4_vl")
# ERNIE-4.5-MoE's: dsv3 takes its blocks only while moe_norm_min + the bias' range is at
# most 1/(2E) (1/12 here, see routing_rules.ernie_refuse): a fixed bias of range 0.08,
# which still changes some choices.
ERNIE = ("ernie4_5_moe", "ernie4_5_moe_no_shared")
ERNIE_BIAS = (0.04, -0.04, 0.024, -0.008, 0.008, -0.024)
# Vision-language models: built as image-text-to-text models (no causal-LM class).
VLMS = ("qwen3_vl_moe", "glm4v_moe", "glm5_next", "qwen3_omni_moe_thinker", "mistral_large4",
        "hy_v4_vl")
# Qwen3-Omni-MoE's talker: a model of its own (TinyTalker), run on token ids.
TALKER = "qwen3_omni_moe_talker"
# Config classes of the families a transformers release may lack (added after 5.17, or
# to come); the tests of a family whose class is missing skip (see missing()).
_CONFIG_CLASS = {"qwen3_vl_moe": "Qwen3VLMoeConfig", "solar_open": "SolarOpenConfig",
                 "deepseek_v32": "DeepseekV32Config", "glm_moe_dsa": "GlmMoeDsaConfig",
                 "glm4v_moe": "Glm4vMoeConfig", "deepseek_v2": "DeepseekV2Config",
                 "deepseek_v2_group_limited": "DeepseekV2Config",
                 "cohere2_moe": "Cohere2MoeConfig", "glm5_next": "Glm5NextConfig",
                 "deepseek_v4": "DeepseekV4Config", "ernie4_5_moe": "Ernie4_5_MoeConfig",
                 "ernie4_5_moe_no_shared": "Ernie4_5_MoeConfig",
                 "bailing_hybrid": "BailingHybridConfig", "flint": "FlintConfig",
                 "lara_mini": "LaraMiniConfig", TALKER: "Qwen3OmniMoeTalkerConfig",
                 "qwen4_exp_text": "Qwen4ExpTextConfig", "mistral_large4": "MistralLarge4Config",
                 "dots3_note": "Dots3NoteTextConfig", "hy_v4": "HYV4Config",
                 "hy_v4_vl": "HYV4VLConfig"}
# GLM-5-Next's SwiGLU clamp limit in its tiny model: its gate and up values (about 1.1
# std) pass it often, so the clamp is active in the tests (test_clamp_is_active checks).
GLM5_NEXT_SWIGLU_LIMIT = 1.0
# HunYuan-V4's (and -VL's), in its routed experts only, active as GLM-5-Next's.
HY_V4_SWIGLU_LIMIT = 1.0
# Laguna's routed scale (the block's): not 1, so that dsv3 must take it.
LAGUNA_ROUTED_SCALE = 2.5


# Families whose block, in an older release, routes otherwise and is not taken (matched
# only with the router class they are listed with): (modeling module, that router class).
_ROUTER_CLASS = {"jamba": ("jamba", "JambaTopKRouter")}


# Families whose unpatched models' output_router_logits fails in older releases (5.17:
# Qwen3-Omni-MoE's thinker returns no router_logits, GraniteMoE's aux loss raises): the
# release their router-logits test needs.
_ROUTER_LOGITS_SINCE = {"qwen3_omni_moe_thinker": "5.24"} | {arch: "5.24" for arch in GRANITE}


def router_logits_missing(arch: str) -> str | None:
    """Why this transformers' ``arch`` model cannot give its router_logits and aux loss
    (a skip reason), or None."""
    since = _ROUTER_LOGITS_SINCE.get(arch)
    have = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    if since is not None and have < tuple(int(part) for part in since.split(".")):
        return (f"transformers {transformers.__version__}'s unpatched {arch} fails "
                f"output_router_logits (fixed by {since})")
    return missing(arch)


def missing(arch: str) -> str | None:
    """Why this transformers cannot build ``arch``'s tiny model (a skip reason), or None."""
    name = _CONFIG_CLASS.get(arch)
    if name is not None and not hasattr(transformers, name):
        return f"transformers {transformers.__version__} has no {name}"
    if arch in _ROUTER_CLASS:
        model, router = _ROUTER_CLASS[arch]
        modeling = importlib.import_module(f"transformers.models.{model}.modeling_{model}")
        if not hasattr(modeling, router):
            return f"transformers {transformers.__version__}'s {model} has no {router}"
    return None


def decoder_layers(model):
    """The decoder layers (of the language model, in a vision-language model)."""
    inner = model.model
    return getattr(inner, "language_model", inner).layers


def sparse_block(model, layer: int = 1):
    """The MoE block (or dense MLP) of decoder layer ``layer``; layer 1 is sparse in every
    tiny model. Most layers keep it at .mlp; Granite's at .block_sparse_moe (beside a
    shared_mlp), Jamba's at .feed_forward."""
    layer = decoder_layers(model)[layer]
    return next(getattr(layer, name) for name in ("block_sparse_moe", "feed_forward", "mlp")
                if hasattr(layer, name))


def tiny_config(arch: str, **overrides):
    """``arch``'s config; ``overrides`` set fields of its language model's config (a
    vision-language model's, or the talker's, text_config)."""
    config = _config(arch)
    target = config.get_text_config() if arch in VLMS or arch == TALKER else config
    for key, value in overrides.items():
        setattr(target, key, value)
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
    if arch == "minimax":  # Mixtral's router under lightning attention; jitter (training only)
        return transformers.MiniMaxConfig(intermediate_size=48, num_local_experts=4,
                                          num_experts_per_tok=2, head_dim=8, block_size=4,
                                          layer_types=["linear_attention", "full_attention"],
                                          **COMMON)
    if arch == "olmoe":  # no renormalization
        return transformers.OlmoeConfig(intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                                        norm_topk_prob=False, **NO_TOKENS, **COMMON)
    if arch == "flex_olmo":  # renormalized top-3 of 5
        return transformers.FlexOlmoConfig(intermediate_size=24, num_experts=5,
                                           num_experts_per_tok=3, norm_topk_prob=True, **NO_TOKENS,
                                           **COMMON)
    if arch in ("qwen3_next", "qwen3_5_moe_text"):  # gated shared expert; renormalized
        linear = dict(head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8,
                      linear_num_key_heads=2, linear_num_value_heads=4,
                      layer_types=["linear_attention", "full_attention"])
        if arch == "qwen3_next":  # without renormalization, which Qwen3.5 always does
            return transformers.Qwen3NextConfig(
                intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, **linear, **COMMON)
        return transformers.Qwen3_5MoeTextConfig(
            moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6,
            num_experts_per_tok=2, **linear, **COMMON)
    if arch == "hunyuan_v1_moe":  # router weight in gate.wg; plain shared MLP of the expert width
        return transformers.HunYuanMoEV1Config(intermediate_size=24, num_experts=6, moe_topk=2,
                                               head_dim=8, **COMMON)
    if arch == "glm4_moe":  # sigmoid, 1 of 2 groups, scale 1.5, no renormalization, 2 shared
        return transformers.Glm4MoeConfig(
            intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8, n_group=2,
            topk_group=1, num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=0,
            routed_scaling_factor=1.5, norm_topk_prob=False, head_dim=8, **COMMON)
    if arch == "glm4_moe_lite":  # layer 0 dense; as DeepSeek-V3 (MLA attention)
        return transformers.Glm4MoeLiteConfig(
            intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8, n_group=4,
            topk_group=2, num_experts_per_tok=3, n_shared_experts=1,
            mlp_layer_types=["dense", "sparse"], routed_scaling_factor=2.5, norm_topk_prob=True,
            q_lora_rank=16, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            **{**COMMON, "num_key_value_heads": 4})
    if arch == "dots1":  # sigmoid, no groups, scale 2, no renormalization
        return transformers.Dots1Config(
            intermediate_size=64, moe_intermediate_size=24, n_routed_experts=6, n_group=1,
            topk_group=1, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
            routed_scaling_factor=2.0, norm_topk_prob=False, head_dim=8,
            layer_types=["full_attention", "full_attention"], **COMMON)
    if arch == "exaone_moe":  # layer 0 dense; sigmoid, 2 of 4 groups, renormalized, scale 2.5
        return transformers.ExaoneMoeConfig(
            intermediate_size=64, moe_intermediate_size=24, num_experts=8, n_group=4, topk_group=2,
            num_experts_per_tok=3, num_shared_experts=1, first_k_dense_replace=1,
            mlp_layer_types=["dense", "sparse"], routed_scaling_factor=2.5, norm_topk_prob=True,
            head_dim=8, layer_types=["sliding_attention", "full_attention"], **COMMON)
    if arch == "minimax_m2":  # sigmoid + the block's bias, renormalized
        return transformers.MiniMaxM2Config(intermediate_size=24, num_local_experts=6,
                                            num_experts_per_tok=2, head_dim=8, **NO_TOKENS,
                                            **COMMON)
    if arch == "afmoe":  # sigmoid + the block's bias, renormalized, scale 2; router at .router
        return transformers.AfmoeConfig(
            intermediate_size=64, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
            num_shared_experts=2, route_scale=2.0, num_dense_layers=0, head_dim=8,
            layer_types=["sliding_attention", "full_attention"], **COMMON)
    if arch == "solar_open":  # sigmoid, 1 of 2 groups, scale 1.5, no renormalization, 2 shared
        return transformers.SolarOpenConfig(
            moe_intermediate_size=24, n_routed_experts=8, n_group=2, topk_group=1,
            num_experts_per_tok=3, n_shared_experts=2, routed_scaling_factor=1.5,
            norm_topk_prob=False, head_dim=8, **COMMON)
    if arch in ("deepseek_v32", "glm_moe_dsa"):  # layer 0 dense; as DeepSeek-V3, plus the
        # indexer's sparse attention (it keeps 4 of the 9 keys)
        cls = (transformers.DeepseekV32Config if arch == "deepseek_v32"
               else transformers.GlmMoeDsaConfig)
        return cls(intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8, n_group=4,
                   topk_group=2, num_experts_per_tok=3, n_shared_experts=1,
                   mlp_layer_types=["dense", "sparse"], routed_scaling_factor=2.5,
                   norm_topk_prob=True, index_topk=4, index_head_dim=8, index_n_heads=2,
                   q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                   v_head_dim=8, **{**COMMON, "num_key_value_heads": 4})
    if arch in ("deepseek_v2", "deepseek_v2_group_limited"):
        # Layer 0 dense; softmax top-3 of 8, scale 1.5, 2 shared. "greedy": the groups and
        # norm_topk_prob (which transformers ignores there) change nothing;
        # "group_limited_greedy": the top-3 of the 2 (of 4) groups with the best expert.
        method = "greedy" if arch == "deepseek_v2" else "group_limited_greedy"
        return transformers.DeepseekV2Config(
            intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8,
            num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1,
            routed_scaling_factor=1.5, topk_method=method, n_group=4, topk_group=2,
            norm_topk_prob=True, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8, **{**COMMON, "num_key_value_heads": 4})
    if arch == "cohere2_moe":  # layer 0 dense; softmax over the top-2 of 6 logits, 2 shared
        # experts added ("sum"); parallel attention and MLP, LayerNorm
        return transformers.Cohere2MoeConfig(
            intermediate_size=24, prefix_dense_intermediate_size=64, num_experts=6,
            num_experts_per_tok=2, num_shared_experts=2, shared_expert_combination_strategy="sum",
            expert_selection_fn="softmax", mlp_layer_types=["dense", "sparse"], head_dim=8,
            **NO_TOKENS, **COMMON)
    if arch in ERNIE:  # softmax top-2 of 6 chosen with the [1, E] bias, renormalized by
        # max(sum, moe_norm_min); layer 0 dense. Shared experts (2, of 2x the expert width)
        # or none; the sparse layer picked by the start index, or by the interval.
        if arch == "ernie4_5_moe":
            layers = dict(moe_num_shared_experts=2, moe_layer_start_index=1)
        else:
            layers = dict(moe_num_shared_experts=0, moe_layer_start_index=0,
                          moe_layer_interval=2)
        return transformers.Ernie4_5_MoeConfig(
            intermediate_size=64, moe_intermediate_size=24, moe_num_experts=6, moe_k=2,
            **layers, **COMMON)
    if arch == "jamba":  # softmax top-2 of 6, never renormalized; router at .router, the block
        # at .feed_forward; Mamba (slow path) then attention
        return transformers.JambaConfig(
            intermediate_size=24, num_experts=6, num_experts_per_tok=2, expert_layer_period=1,
            expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1,
            use_mamba_kernels=False, mamba_d_state=4, mamba_dt_rank=4, **COMMON)
    if arch in ("kimi_linear", "bailing_hybrid"):  # layer 0 dense; as DeepSeek-V3, under
        # linear (KDA) attention then MLA
        mla = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                   v_head_dim=8, linear_head_dim=8, linear_num_heads=4,
                   layer_types=["linear_attention", "full_attention"],
                   mlp_layer_types=["dense", "sparse"])
        routing = dict(intermediate_size=64, moe_intermediate_size=24, num_local_experts=8,
                       n_group=4, topk_group=2, num_experts_per_tok=3, n_shared_experts=1,
                       routed_scaling_factor=2.5, norm_topk_prob=True)
        if arch == "kimi_linear":
            return transformers.KimiLinearConfig(**routing, **mla, **NO_TOKENS,
                                                 **{**COMMON, "num_key_value_heads": 4})
        return transformers.BailingHybridConfig(**routing, **mla, head_dim=8, **NO_TOKENS,
                                                **{**COMMON, "num_key_value_heads": 4})
    if arch == "mimo_v2_flash":  # DeepSeek-V3's router (2 of 4 groups, scale 2.5, no
        # renormalization), no shared experts
        return transformers.MiMoV2FlashConfig(
            intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8, n_group=4,
            topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5, norm_topk_prob=False,
            head_dim=8, v_head_dim=8, sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            mlp_layer_types=["sparse", "sparse"], **COMMON)
    if arch == "hy_v3":  # sigmoid + the block's bias, renormalized, scale 2.5, 2 shared
        return transformers.HYV3Config(
            intermediate_size=64, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
            num_shared_experts=2, router_scaling_factor=2.5, head_dim=8,
            mlp_layer_types=["sparse", "sparse"], **COMMON)
    if arch == "mistral4":  # layer 0 dense; softmax, 2 of 4 groups (by their top-2 sum),
        # scale 1.5, no renormalization, 1 shared
        return transformers.Mistral4Config(
            intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8, n_group=4,
            topk_group=2, num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
            routed_scaling_factor=1.5, norm_topk_prob=False, q_lora_rank=16, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, **NO_TOKENS,
            **{**COMMON, "num_key_value_heads": 4})
    if arch in GRANITE:  # softmax over the top-2 of 6 logits; the block at
        # .block_sparse_moe, its router at .router (a shared MLP, where the model has one, is
        # outside the block)
        cls = {"granitemoe": transformers.GraniteMoeConfig,
               "granitemoeshared": transformers.GraniteMoeSharedConfig,
               "granitemoehybrid": transformers.GraniteMoeHybridConfig,
               "granitemoe_swa": transformers.GraniteMoeSWAConfig}[arch]
        extra = {"granitemoeshared": dict(shared_intermediate_size=40),
                 "granitemoehybrid": dict(shared_intermediate_size=40, mamba_n_heads=8,
                                          mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=4,
                                          layer_types=["mamba", "attention"]),
                 "granitemoe_swa": dict(shared_intermediate_size=40, sliding_window=4)}
        return cls(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2,
                   residual_multiplier=0.5, **extra.get(arch, {}), **NO_TOKENS, **COMMON)
    if arch == "laguna":  # layer 0 dense; sigmoid + the router's bias, renormalized, the
        # routed output scaled by the block (2.5); shared expert of 2x the expert width
        return transformers.LagunaConfig(
            intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=48,
            num_experts=6, num_experts_per_tok=2, moe_routed_scaling_factor=LAGUNA_ROUTED_SCALE,
            head_dim=8, sliding_window=4, mlp_layer_types=["dense", "sparse"], **COMMON)
    if arch == "qwen4_exp_text":  # Qwen2-MoE's block (gated shared expert, no
        # renormalization) under two hyper-connection streams; Gated DeltaNet then the QSA
        # indexer's sparse attention (4 keys, in blocks of 2)
        return transformers.Qwen4ExpTextConfig(
            moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6,
            num_experts_per_tok=2, norm_topk_prob=False, head_dim=8, linear_key_head_dim=8,
            linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
            layer_types=["linear_attention", "full_attention"], hc_count=2, hc_lowrank=8,
            indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4,
            indexer_compress_ratio=2, **COMMON)
    if arch == TALKER:  # Qwen2-MoE's block (gated shared expert, no renormalization) in every
        # layer; M-RoPE over head_dim 8; a one-layer code predictor for its generate
        rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1],
                    mrope_interleaved=True)
        # vocab_size and spatial_merge_size: the talker's forward and __init__ read them
        # from the outer config, which the checkpoints' configs carry them in.
        return transformers.Qwen3OmniMoeTalkerConfig(
            text_config=dict(intermediate_size=64, moe_intermediate_size=24,
                             shared_expert_intermediate_size=40, num_experts=6,
                             num_experts_per_tok=2, norm_topk_prob=False, head_dim=8,
                             rope_parameters=rope, **COMMON),
            code_predictor_config=dict(num_code_groups=2, head_dim=8, intermediate_size=48,
                                       **{**COMMON, "num_hidden_layers": 1}),
            num_code_groups=2, thinker_hidden_size=32, spatial_merge_size=2,
            vocab_size=COMMON["vocab_size"])
    if arch == "dots3_note":  # layer 0 dense; as DeepSeek-V3 (MLA, the indexer's sparse
        # attention keeping 4 keys), one shared expert 2x the routed experts' width
        return transformers.Dots3NoteTextConfig(
            intermediate_size=64, moe_intermediate_size=24, shared_experts_intermediate_size=48,
            n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
            n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
            norm_topk_prob=True, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8, head_dim=16, index_topk=4, index_head_dim=8,
            index_n_heads=2, use_sliding_window=False, **NO_TOKENS,
            **{**COMMON, "num_key_value_heads": 4})
    if arch == "axk2":  # layer 0 dense; DeepSeek-V3's router without groups (A.X-K2-Light),
        # scale 2.5, renormalized, 1 shared; MLA with the indexer's sparse attention
        return transformers.AXK2Config(
            intermediate_size=64, moe_intermediate_size=24, n_routed_experts=6,
            num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=2.5,
            norm_topk_prob=True, mlp_layer_types=["dense", "sparse"], q_lora_rank=16,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=16,
            index_topk=4, index_head_dim=8, index_n_heads=2, gated_norm_rank=4, **NO_TOKENS,
            **{**COMMON, "num_key_value_heads": 4})
    if arch == "mellum":  # softmax top-2 of 6, no renormalization
        return transformers.MellumConfig(
            intermediate_size=64, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
            norm_topk_prob=False, head_dim=8, sliding_window=4,
            mlp_layer_types=["sparse", "sparse"], **COMMON)
    if arch in ("flint", "lara_mini"):  # a plain (ungated) shared expert, 2x the expert width
        if arch == "flint":  # sigmoid top-2 of 6, renormalized
            return transformers.FlintConfig(
                intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=48,
                num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, head_dim=8,
                sliding_window=4, mlp_only_layers=[], **COMMON)
        # softmax top-2 of 6, no renormalization; Gated DeltaNet then attention
        return transformers.LaraMiniConfig(
            moe_intermediate_size=24, shared_expert_intermediate_size=48, num_experts=6,
            num_experts_per_tok=2, norm_topk_prob=False, head_dim=8, linear_key_head_dim=8,
            linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
            layer_types=["linear_attention", "full_attention"], **NO_TOKENS, **COMMON)
    # Vision towers: one block, out to D=32.
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                  patch_size=4)
    if arch == "qwen3_vl_moe":  # softmax top-2 of 6, always renormalized; M-RoPE over head_dim 8
        rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1],
                    mrope_interleaved=True)
        return transformers.Qwen3VLMoeConfig(
            text_config=dict(intermediate_size=64, moe_intermediate_size=24, num_experts=6,
                             num_experts_per_tok=2, head_dim=8, rope_parameters=rope, **COMMON),
            vision_config=dict(num_position_embeddings=16, deepstack_visual_indexes=[0],
                               **vision))
    if arch == "glm4v_moe":  # layer 0 dense; as DeepSeek-V3; M-RoPE over half of head_dim 16
        rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1],
                    partial_rotary_factor=0.5)
        return transformers.Glm4vMoeConfig(
            text_config=dict(intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8,
                             n_group=4, topk_group=2, num_experts_per_tok=3, n_shared_experts=1,
                             first_k_dense_replace=1, routed_scaling_factor=2.5,
                             norm_topk_prob=True, rope_parameters=rope,
                             **{**COMMON, "num_attention_heads": 2, "num_key_value_heads": 1}),
            vision_config=dict(image_size=16, **vision))
    if arch == "glm5_next":  # layer 0 dense; as DeepSeek-V3 but the clamped SwiGLU (limit
        # 1, in the experts and the shared expert); KDA linear attention then the indexer's
        # sparse attention (keeps 4 keys in pools of 2), two hyper-connection streams
        text = dict(intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8,
                    n_group=4, topk_group=2, num_experts_per_tok=3, n_shared_experts=1,
                    mlp_layer_types=["dense", "sparse"], routed_scaling_factor=2.5,
                    norm_topk_prob=True, swiglu_limit=GLM5_NEXT_SWIGLU_LIMIT, q_lora_rank=16,
                    kv_lora_rank=16, qk_rope_head_dim=0, qk_nope_head_dim=8, v_head_dim=8,
                    index_topk=4, index_kpool=2, index_head_dim=8, index_n_heads=2,
                    linear_head_dim=8, linear_num_heads=4, hc_mult=2,
                    layer_types=["linear_attention", "full_attention"], pad_token_id=None,
                    **{**COMMON, "num_key_value_heads": 4})
        return transformers.Glm5NextConfig(
            text_config=text, vision_config=dict(image_size=16, projection_intermediate_size=16,
                                                 **vision))
    # HunYuan-V4 (-VL: its language model): layer 0 dense; as DeepSeek-V3 but the clamped
    # SwiGLU (limit 1) in the routed experts, not the shared one; MLA with the indexer's
    # sparse attention (4 keys), two hyper-connection streams
    hy_v4 = dict(intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8, n_group=4,
                 topk_group=2, num_experts_per_tok=3, n_shared_experts=1,
                 routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=16,
                 kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                 index_topk=4, index_head_dim=8, index_n_heads=2, hc_mult=2,
                 swiglu_limit=HY_V4_SWIGLU_LIMIT, mlp_layer_types=["dense", "sparse"],
                 **NO_TOKENS, **{**COMMON, "num_key_value_heads": 4})
    if arch == "hy_v4":
        return transformers.HYV4Config(**hy_v4)
    if arch == "hy_v4_vl":  # M-RoPE over the rope slice (qk_rope_head_dim 8)
        rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1])
        return transformers.HYV4VLConfig(
            text_config=dict(rope_parameters=rope, **hy_v4),
            vision_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                               num_attention_heads=2, out_hidden_size=32, patch_size=4,
                               max_image_size=16))
    if arch == "mistral_large4":  # layer 0 dense; Mistral-4's router in fp32, always
        # renormalized: softmax, 2 of 4 groups (by their top-2 sum), scale 1.5, 1 shared;
        # MLA with the indexer's sparse attention (4 keys); a one-layer Pixtral tower
        text = dict(intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8,
                    n_group=4, topk_group=2, num_experts_per_tok=3, n_shared_experts=1,
                    first_k_dense_replace=1, routed_scaling_factor=1.5, q_lora_rank=16,
                    kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                    index_topk=4, index_head_dim=8, index_n_heads=2,
                    rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                    **NO_TOKENS, **{**COMMON, "num_key_value_heads": 4})
        return transformers.MistralLarge4Config(
            text_config=text, vision_config=dict(
                model_type="pixtral", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, head_dim=8, patch_size=4, image_size=16))
    if arch == "qwen3_omni_moe_thinker":  # Qwen3-Omni-MoE's thinker: softmax top-2 of 6, no
        # renormalization; M-RoPE over head_dim 8; one-block vision and audio towers
        rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1],
                    mrope_interleaved=True)
        config = transformers.Qwen3OmniMoeThinkerConfig(
            text_config=dict(intermediate_size=64, moe_intermediate_size=24, num_experts=6,
                             num_experts_per_tok=2, norm_topk_prob=False, head_dim=8,
                             rope_parameters=rope, **COMMON),
            vision_config=dict(num_position_embeddings=16, deepstack_visual_indexes=[0],
                               **vision),
            audio_config=dict(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2,
                              encoder_ffn_dim=16, d_model=16, output_dim=32,
                              downsample_hidden_size=8))
        # generate's position ids read it, which the config class does not define (the
        # checkpoints' configs carry it): Qwen3-Omni's id, past the tiny vocabulary.
        config.vision_start_token_id = 151652
        return config
    raise ValueError(f"arch: unknown {arch!r}")


# Sparse MoE blocks in each tiny model (DeepSeek-V3's first layer stays dense).
N_SPARSE = {arch: 2 for arch in ARCHS} | {"deepseek_v3": 1, "glm4_moe_lite": 1, "exaone_moe": 1,
                                          "deepseek_v32": 1, "glm_moe_dsa": 1, "glm4v_moe": 1,
                                          "deepseek_v2": 1, "deepseek_v2_group_limited": 1,
                                          "cohere2_moe": 1, "glm5_next": 1,
                                          "ernie4_5_moe": 1, "ernie4_5_moe_no_shared": 1,
                                          "kimi_linear": 1, "bailing_hybrid": 1,
                                          "mistral4": 1, "laguna": 1, "axk2": 1,
                                          "mistral_large4": 1, "dots3_note": 1, "hy_v4": 1,
                                          "hy_v4_vl": 1}


def _tiny_talker_class():
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling

    class TinyTalker(modeling.Qwen3OmniMoeTalkerForConditionalGeneration):
        """Qwen3-Omni-MoE's talker on token ids (its codec embeddings, as its generate
        embeds the codes it produces), and generating with no thinker: no trailing text
        (trailing_text_hidden empty, tts_pad_embed a fixed vector), the code predictor's
        residual codes drawn greedily at each step."""

        def forward(self, input_ids=None, inputs_embeds=None, trailing_text_hidden=None,
                    tts_pad_embed=None, **kwargs):
            if inputs_embeds is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
            if kwargs.get("attention_mask") is None:  # 5.17's positions need both
                kwargs["attention_mask"] = torch.ones(inputs_embeds.shape[:2], dtype=torch.long,
                                                      device=inputs_embeds.device)
            if kwargs.get("talker_input_ids") is None:
                kwargs["talker_input_ids"] = input_ids
            # (the talker embeds nothing itself: input_ids, where 5.17 reads their shape)
            return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                   trailing_text_hidden=trailing_text_hidden,
                                   tts_pad_embed=tts_pad_embed, **kwargs)

        def generate(self, input_ids, **kwargs):
            dim = self.config.text_config.hidden_size
            kwargs.setdefault("output_hidden_states", True)  # the code predictor reads them
            kwargs.setdefault("trailing_text_hidden", torch.zeros(input_ids.shape[0], 0, dim))
            kwargs.setdefault("tts_pad_embed", torch.full((1, 1, dim), 0.1))
            return super().generate(input_ids, **kwargs)

    return TinyTalker


def tiny_model(arch: str, experts_implementation: str = "eager", **overrides):
    """A fresh tiny model in train mode (dropout is 0 in these configs); ``overrides``
    set config fields (see tiny_config)."""
    torch.manual_seed(0)
    if arch == "mistral4":  # a causal LM that transformers' auto classes do not list as one
        auto = transformers.Mistral4ForCausalLM
    elif arch == TALKER:
        auto = _tiny_talker_class()
    else:
        auto = (transformers.AutoModelForImageTextToText if arch in VLMS
                else transformers.AutoModelForCausalLM)
    build = auto._from_config if arch in ("mistral4", TALKER) else auto.from_config
    model = build(tiny_config(arch, **overrides), experts_implementation=experts_implementation)
    if arch in _BIASED:
        # A non-zero selection bias, so that selecting with it (and weighting without
        # it) is exercised; big enough to change some choices.
        for name, bias in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith(("e_score_correction_bias", "mlp.expert_bias")):
                with torch.no_grad():
                    if arch in ERNIE:
                        bias.copy_(torch.tensor(ERNIE_BIAS).view_as(bias))
                    else:
                        bias.copy_(0.1 * torch.randn_like(bias))
    if arch == TALKER:  # transformers initializes the thinker's experts and router, not the
        # talker's: its experts would hold whatever memory they were given, its router zeros
        for layer in decoder_layers(model):
            with torch.no_grad():
                for weight in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj,
                               layer.mlp.gate.weight):
                    weight.normal_(0.0, COMMON["initializer_range"])
    if arch in ERNIE:  # transformers 5.17 leaves ERNIE's router weight at its zeros
        for layer in decoder_layers(model):
            if hasattr(layer.mlp, "gate"):
                with torch.no_grad():
                    layer.mlp.gate.weight.normal_(0.0, COMMON["initializer_range"])
    return model.train()


def input_ids(batch: int = 2, seq: int = 9) -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (batch, seq),
                         generator=torch.Generator().manual_seed(1))
