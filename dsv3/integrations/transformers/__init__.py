"""dsv3 under transformers (v5) models. Importing this package registers
``experts_implementation="dsv3"`` with transformers, so

    import dsv3.integrations.transformers
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="dsv3")
    model.set_experts_implementation("dsv3")  # or switch a loaded model

runs the experts of any model whose experts module transformers dispatches (plain
SwiGLU experts, and the clamped SwiGLU experts of GLM-5-Next, DeepSeek-V4, HunYuan-V4 and
HunYuan-V4-VL) on dsv3's kernels, with the model's own router. To fuse the router too,
replace whole blocks (Mixtral, MiniMax, Qwen2-MoE, Qwen3-MoE, Qwen3-Next, Qwen3.5-MoE,
Qwen3-VL-MoE's, Qwen3-Omni-MoE's thinker's and talker's and Qwen4-Exp's language models,
OLMoE, FlexOlmo, HunYuan-MoE-V1, Mellum, Lara-Mini, Flint, Jamba, GraniteMoE (plain,
Shared, Hybrid and SWA), DeepSeek-V3, DeepSeek-V3.2, GLM-4-MoE and Sarvam-MoE,
GLM-4-MoE-Lite, GLM-MoE-DSA, GLM-4V-MoE's and GLM-5-Next's language models, HunYuan-V4
and HunYuan-V4-VL's language model, dots.llm1, dots3-note's language model, EXAONE-MoE,
Solar-Open, Kimi-Linear, Bailing-Hybrid, MiMo-V2-Flash, MiniMax-M2, AFMoE, HunYuan-V3,
DeepSeek-V2 (topk_method "greedy" and "group_limited_greedy"), Cohere2-MoE with softmax
selection, ERNIE-4.5-MoE while its moe_norm_min clamp cannot act, Mistral-4 and
Mistral-Large-4's language model while their top-k fits in the kept groups, Laguna
without router softcapping (its block's routed scale taken), A.X-K2 without expert
groups; other modes of the last seven are refused with the reason; see architectures.py;
and GPT-OSS, whose biased experts go into a block of their own, gpt_oss.GptOssMoE):

    n = dsv3.integrations.transformers.patch_moe(model)

``from_module``/``to_module`` convert one block each way, sharing the Parameters.
"""
from dsv3.integrations.transformers import experts
from dsv3.integrations.transformers.architectures import ARCHITECTURES
from dsv3.integrations.transformers.block import TransformersMoE
from dsv3.integrations.transformers.converters import from_module, to_module
from dsv3.integrations.transformers.gpt_oss import GptOssMoE
from dsv3.integrations.transformers.patch import patch_moe, unpatch_moe

experts.register()

__all__ = ["ARCHITECTURES", "GptOssMoE", "TransformersMoE", "from_module", "patch_moe",
           "to_module", "unpatch_moe"]
