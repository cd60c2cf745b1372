"""What dsv3 needs to know about each transformers sparse MoE block it can replace.

All of them keep their experts as transformers' fused 3D parameters, ``gate_up_proj``
[E, 2F, D] (gate rows first) and ``down_proj`` [E, D, F]: exactly dsv3.MoE's layout,
so the converters hand the very same Parameters over, no copy. What differs between
architectures is the router (read into MoEConfig here), where the block keeps it and
its selection bias, and the shared expert. Only blocks that compute exactly what
dsv3.MoE computes are listed (some in some modes only, see below); others can still
run their experts on dsv3 through ``experts_implementation="dsv3"``.

| architecture               | router                                               | shared expert   |
|----------------------------|------------------------------------------------------|-----------------|
| Mixtral, MiniMax           | softmax, top-k, renormalized                         | none            |
| Qwen3-MoE, OLMoE,          | softmax, top-k, renormalized iff norm_topk_prob      | none            |
| FlexOlmo, Mellum,          |                                                      |                 |
| Qwen3-Omni-MoE (thinker)   |                                                      |                 |
| Lara-Mini                  | softmax, top-k, renormalized iff norm_topk_prob      | plain (one, at  |
|                            |                                                      | shared_expert)  |
| Jamba                      | softmax, top-k, never renormalized; router in        | none            |
|                            | block.router                                         |                 |
| Qwen2-MoE, Qwen3-Next,     | softmax, top-k, renormalized iff norm_topk_prob      | sigmoid-gated   |
| Qwen3-Omni-MoE (talker),   |                                                      |                 |
| Qwen4-Exp (text)           |                                                      |                 |
| Qwen3.5-MoE                | softmax, top-k, renormalized                         | sigmoid-gated   |
| Qwen3-VL-MoE (text)        | softmax, top-k, renormalized                         | none            |
| HunYuan-MoE-V1             | softmax, top-k, renormalized; weight in gate.wg      | plain (one)     |
| GraniteMoE, -Shared,       | top-k logits, softmax over them (= renormalized);    | none (a shared  |
| -Hybrid, -SWA              | router in block.router                               | MLP is outside  |
|                            |                                                      | the block)      |
| DeepSeek-V3 and -V3.2,     | sigmoid + correction bias, group-limited top-k,      | plain (n)       |
| GLM-4-MoE, GLM-4-MoE-Lite, | scaled, renormalized iff norm_topk_prob              |                 |
| GLM-MoE-DSA, GLM-4V-MoE    |                                                      |                 |
| (text), dots.llm1,         |                                                      |                 |
| EXAONE-MoE, Solar-Open,    |                                                      |                 |
| Kimi-Linear,               |                                                      |                 |
| Bailing-Hybrid, dots3-note |                                                      |                 |
| (text), GLM-5-Next (text;  |                                                      |                 |
| clamped SwiGLU)            |                                                      |                 |
| HunYuan-V4, -V4-VL (text)  | DeepSeek-V3's; routed experts' SwiGLU clamped        | plain (n), not  |
|                            |                                                      | clamped         |
| MiMo-V2-Flash              | DeepSeek-V3's                                        | none            |
| A.X-K2                     | DeepSeek-V3's, without groups (see below)            | plain (n)       |
| MiniMax-M2                 | sigmoid + the block's bias, top-k, renormalized      | none            |
| AFMoE                      | sigmoid + the block's bias, top-k, renormalized,     | plain (n)       |
|                            | scaled; router in block.router                       |                 |
| HunYuan-V3                 | sigmoid + the block's bias, top-k, renormalized,     | plain (n)       |
|                            | scaled by the router's router_scaling_factor         |                 |
| Laguna                     | sigmoid + the router's frozen bias Parameter, top-k, | plain (one, at  |
|                            | renormalized, scaled by the block (see below)        | shared_experts) |
| Flint                      | sigmoid, top-k, renormalized iff norm_topk_prob      | plain (one, at  |
|                            |                                                      | shared_expert)  |
| Mistral-4                  | softmax, group-limited top-k (groups by their top-2  | plain (n)       |
|                            | sum), scaled, renormalized iff norm_topk_prob (see   |                 |
|                            | below)                                               |                 |
| Mistral-Large-4 (text)     | Mistral-4's, logits in fp32, always renormalized     | plain (n)       |
| DeepSeek-V2                | softmax, top-k (greedy, or group-limited with groups | plain (n)       |
|                            | scored by their best expert), scaled, never          |                 |
|                            | renormalized                                         |                 |
| Cohere2-MoE (softmax)      | top-k logits, softmax over them (= renormalized)     | none, or "sum"  |
| ERNIE-4.5-MoE              | softmax + the [1, E] bias of gate.moe_statics,       | plain (n), or   |
|                            | top-k, renormalized (by max(sum, moe_norm_min):      | none            |
|                            | see below)                                           |                 |

Sarvam-MoE's models are built from GLM-4-MoE's classes (and Sarvam-MLA's from
DeepSeek-V3's), so they are patched too. Kimi-Linear's and Bailing-Hybrid's MoE blocks,
routers and experts are DeepSeek-V3's line for line (their linear attention is outside
them), MiMo-V2-Flash's too but for the shared experts it has none of, and dots3-note's
language model's (its attention's indexer and sliding windows are outside the block),
whose shared MLP is n_shared_experts * shared_experts_intermediate_size wide; Mellum's
and Qwen3-Omni-MoE's thinker's are Qwen3-MoE's; Qwen3-Omni-MoE's talker's and
Qwen4-Exp's language model's are Qwen2-MoE's, gated shared expert and all (Qwen4-Exp's
hyper-connections, linear attention and n-gram embeddings are outside the block);
Mistral-Large-4's language model's router is Mistral-4's with the logits in fp32 (as
dsv3 routes) and no norm_topk_prob (always renormalized); the four GraniteMoE families
share one block, whose router takes the top-k logits and the softmax over them, as
Cohere2-MoE's softmax mode does (the same weights as the renormalized top-k of the full
softmax, the same experts but where distinct logits round to the same fp32 probability);
their shared MLP (GraniteMoE-Shared, -Hybrid, -SWA) is added by the decoder layer,
outside the block. A "plain (one)" shared expert is one SwiGLU MLP of any width
(HunYuan's, Flint's, Lara-Mini's, Laguna's; dots3-note's too), kept as the HF module;
dsv3.MoE counts it as width // ffn_dim shared experts, so a plain dsv3.MoE converts into
such a block only where the width is a multiple of the experts' (the checkpoints' are;
to_module checks the width). HunYuan-V3's enable_moe_fp32_combine adds the routed and
shared outputs in fp32 and rounds once, which is what adding them in bf16 does.
DeepSeek-V3.2's and GLM-MoE-DSA's indexer (sparse attention) is in the attention, not in
the MoE block: their routers, experts and blocks are DeepSeek-V3's, line for line. So
are GLM-5-Next's (its text MoE block, router and experts loop), but for the clamped
SwiGLU of its experts and shared experts: gate = gate.clamp(max=swiglu_limit), up =
up.clamp(-swiglu_limit, swiglu_limit), then silu(gate) * up, which dsv3.MoE computes
with MoEConfig.swiglu_limit (read from the experts; the kept HF shared-expert module
clamps itself, and a plain dsv3.MoE's fused shared experts clamp with the same limit).
HunYuan-V4's and HunYuan-V4-VL's blocks, routers and experts are DeepSeek-V3's too
(their hyper-connections and indexer are outside the block), with GLM-5-Next's clamp
(swiglu_limit) in the routed experts only: their shared experts (an HYV4MLP of act_fn)
do not clamp. A patched block runs them as that kept HF module, unclamped, and clamps
the routed experts only, as transformers; to_module puts a plain dsv3.MoE's fused shared
experts, which clamp with swiglu_limit, into such a block only once their clamp is
lifted (moe.shared_experts.swiglu_limit = None; ``unclamped_shared``), and GLM-5-Next's
only with it. The vision-language models (Qwen3-VL-MoE, GLM-4V-MoE, GLM-5-Next,
Qwen3-Omni-MoE's thinker, Mistral-Large-4, HunYuan-V4-VL) have their blocks in the
language model, whose config (text_config) is the block's; ``to_module`` takes the whole
model's config too (Qwen3-Omni-MoE's, whose text config is its thinker's; the talker's
config, Qwen3OmniMoeTalkerConfig, picks the talker's block). GLM-GA's models are
GLM-4.6V's, whose language model is built from the text config: GLM-4V's dense one by
default (nothing to patch), GLM-4V-MoE's for a glm4v_moe_text config (patched as such).

Some architectures compute dsv3.MoE's function in some modes only: their ``refuse``
names the setting of a block it cannot compute and why, and from_module (so
patch_moe, before it replaces anything) and to_module raise a ValueError saying so.
Those modes' experts still run on dsv3 through ``experts_implementation="dsv3"``.

- DeepSeek-V2: ``topk_method="greedy"`` is softmax, top-k, times routed_scaling_factor,
  never renormalized (transformers' code ignores the config's norm_topk_prob), logits
  and weights in fp32: dsv3.MoE's softmax routing with normalize_weights=False.
  ``"group_limited_greedy"`` scores a group by its best softmax score, keeps the
  topk_group best groups and takes the top-k of the scores with the other groups' set
  to 0: dsv3.MoE's group_score="max" (n_groups=n_group, topk_groups=topk_group), which
  excludes those experts instead. The two choose alike while every kept score is > 0
  (a softmax score is, unless it underflows to 0, and then the copy it adds weighs 0
  either way) and no two scores or group maxima tie exactly (dsv3 gives a tie to the
  lower index; transformers' topk orders ties as it likes, e.g. the higher indices on
  CPU); topk_group == n_group keeps every group: greedy. Refused: a top_k above
  the kept groups' experts (transformers then fills the top-k with other groups'
  experts at weight 0; dsv3.MoE chooses in the kept groups only), and group settings
  its router cannot split the experts by.
- Cohere2-MoE: ``expert_selection_fn="softmax"`` takes the top-k logits and the softmax
  over those k, which is the renormalized top-k of the softmax over all: the same
  weights, and the same experts but where distinct logits round to the same fp32
  probability (equal to the ulp, or both underflowed to a weight of 0, which adds
  nothing). The shared experts (if any) must be combined by "sum". Refused:
  ``"sigmoid"`` (fp32 sigmoid is 1.0 for every logit above ~16.6 and flat well before,
  so dsv3, choosing on sigmoid(logits), breaks ties by index where the logits differ
  plainly) and ``"average"`` ((routed + shared) / 2; dsv3.MoE adds shared experts
  unscaled).
- ERNIE-4.5-MoE: softmax (logits, scores and weights in fp32), the top-k of softmax +
  bias (gate.moe_statics.e_score_correction_bias, a frozen fp32 Parameter [1, E]: dsv3
  routes on an [E] view of it, the same storage, and to_module puts the Parameter back),
  weights p / max(sum, moe_norm_min). dsv3.MoE computes p * (1 / (sum + 1e-20)) (C++;
  the Triton kernel p / (sum + 1e-20)), where the 1e-20 is below the sum's ulp: the same
  as Mixtral's p / sum, and DeepSeek-V3's p / (sum + 1e-20), while the clamp does not
  act. Without a bias the sum is at least the top-1 probability, >= 1/E; with one the
  chosen experts may all be improbable, so the bias counts too: accepted while
  moe_norm_min + the bias' range (max - min) <= 1/(2E), which keeps every chosen
  expert's probability within that range of the top one's, and the sum above 1/(2E)
  and moe_norm_min (routing_rules.ernie_refuse). Checked on the bias' values when
  converting: a bias still on the meta device is refused, and one loaded into a patched
  model afterwards is not checked again. Refused otherwise (ERNIE-4.5's own moe_norm_min, 1e-12, passes
  unless the bias' range nears 1/(2E): 1/128 for 64 experts). Shared experts
  (moe_intermediate_size * moe_num_shared_experts wide) only where
  moe_num_shared_experts > 0.

- Mistral-4 (and Mistral-Large-4, whose logits are fp32 and weights always
  renormalized): softmax (logits and scores in the model dtype: the same in fp32, and in
  bf16 dsv3 routes in fp32 as it does for Mixtral's bf16 logits), groups scored by the
  sum of their two best scores (group_score="top2_sum"), the other groups' scores set
  to 0 (not -inf) before the top-k, weights renormalized (+1e-20) iff norm_topk_prob,
  times routed_scaling_factor. A softmax score is > 0, so while top_k fits in the kept
  groups a zeroed expert is never chosen (one whose score underflows to 0 weighs 0
  either way): dsv3.MoE's group-limited routing. Ties as DeepSeek-V2's. Refused: top_k
  above the kept groups' experts (transformers fills in other groups' at weight 0), and
  groups its router cannot score (n_group not dividing the experts, or groups of one,
  where transformers' top-2 fails).
- Laguna: sigmoid of the (fp32) logits + the router's frozen bias Parameter, top-k,
  renormalized (p / sum), weights in the model dtype; the block multiplies the routed
  output by moe_routed_scaling_factor: (sum_k w_k y_k) * s, dsv3.MoE's route_scale s
  (sum_k (s w_k) y_k), which the entry's ``block_routing`` reads from the block (the
  router does not hold it). Refused: moe_router_logit_softcapping > 0 (tanh-softcapped
  logits), and a routed scale that is not a finite number > 0 (route_scale's range).
- A.X-K2: DeepSeek-V3's router, but with n_group set it zeroes (not -inf) the left-out
  groups' selection scores, sigmoid + bias, which a kept expert's score + a negative bias
  falls below, so transformers may choose a left-out expert. Accepted without groups
  (n_group None, A.X-K2-Light) or with every group kept; refused otherwise.

Near misses, left to ``experts_implementation="dsv3"``: LFM2-MoE (renormalizes with
+1e-6), ERNIE-4.5-VL-MoE (its
block routes text and vision tokens, by moe_mm_token_type_ids, to two expert sets of
different widths, and returns its router logits too), A.X-K1 (normalizes the block's
output: a post_mlp_layernorm inside the block), Kolibri-1 (chooses on logits + bias and
weighs by the sigmoid of the chosen logits; dsv3 chooses on sigmoid + bias), Inkling
(the router weighs the shared experts with the routed ones, a softmax of logsigmoids
over both, times a learned global scale), Inkling-2 (softcapped SwiGLU experts), MiniMax-M3-VL
(experts compute (up + 1) * gate * sigmoid(alpha * gate), clamped), Zaya (an MLP router
over carried router states, with a skip expert), Gemma-4 (no MoE block of its own: the
decoder MLP runs the experts beside a dense MLP; its router RMS-normalizes and scales
its input and weighs by per-expert scales), Aria (experts stored transposed, [E, in,
out], refused by the converters), Beam (DeepSeek-V3's router without shared experts, and
a routed scale of the block's that ``block_routing`` could read, but its experts compute
the SwiGLU as (silu(gate.float()) * up.float()).to(dtype), one rounding, through an
_apply_gate of their own that experts.py does not know; dsv3's SwiGLU, as the default
gate, computes in the model dtype: the same in fp32 models only). Not listed:
DeepSeek-V4, which scores with sqrt(softplus) and routes its first layers by a
token-id table (hash_moe); its experts (the same clamped SwiGLU as GLM-5-Next's) run on
dsv3 through ``experts_implementation="dsv3"`` (experts.CLAMPED_SWIGLU_EXPERTS). Not
run on dsv3 at all: LongCat-Flash (identity experts beside the routed ones, no
renormalization), whose experts module takes no ``experts_implementation``.

Blocks are matched by exact class (module and name), never by isinstance: a subclass
in another model may change the forward, and we would silently compute the wrong thing.
The block's module must also define the router class it is listed with: transformers
5.17's JambaSparseMoeBlock (same module, same name) routes through a plain nn.Linear
and has no JambaTopKRouter, and is not taken.
"""
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from dsv3.integrations.transformers.routing_rules import (softmax_routing,
                                                          softmax_routing_always_normalized,
                                                          softmax_routing_never_normalized,
                                                          sigmoid_routing, hy_v3_routing,
                                                          mistral4_routing, deepseek_routing,
                                                          minimax_m2_routing, afmoe_routing,
                                                          deepseek_v2_routing, deepseek_v2_refuse,
                                                          cohere2_moe_refuse, ernie_refuse,
                                                          axk2_routing, axk2_refuse,
                                                          mistral4_refuse, laguna_refuse,
                                                          laguna_block_routing)


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
    gate: str = "gate"  # the block's router submodule
    gate_weight: str = "weight"  # the router's [E, D] weight, a path inside the router
    bias: str | None = None  # the selection-only bias [E], a path inside the block
    # The bias is stored [1, E] (ERNIE-4.5-MoE's moe_statics): dsv3.MoE routes on an [E]
    # view of it, and to_module puts back the [1, E] Parameter the view was taken of.
    bias_rows: bool = False
    # Other model_types whose models are built from these very classes (to_module's
    # hf_config may be theirs).
    aliases: tuple[str, ...] = ()
    # For blocks whose config may select a mode dsv3.MoE does not compute: given the
    # block, (the setting, why dsv3.MoE cannot compute it), or None to accept it.
    refuse: Callable[[nn.Module], tuple[str, str] | None] | None = None
    # MoEConfig routing fields the block holds outside its router (Laguna's routed
    # scale): read from the (accepted) block, over those ``routing`` read.
    block_routing: Callable[[nn.Module], dict] | None = None
    # The shared experts do not clamp their SwiGLU though the routed ones do (HunYuan-V4):
    # a plain dsv3.MoE's fused shared experts, which clamp with swiglu_limit, are refused.
    unclamped_shared: bool = False

    def classes(self) -> tuple[type, type]:
        """(block class, router class), importing the modeling module."""
        module = importlib.import_module(self.module)
        return getattr(module, self.block), getattr(module, self.router)

    def matches(self, module: nn.Module) -> bool:
        cls = type(module)
        if cls.__module__ != self.module or cls.__name__ != self.block:
            return False
        # The same block class of a release that routes otherwise (transformers 5.17's
        # JambaSparseMoeBlock routes through a plain nn.Linear, there is no JambaTopKRouter)
        # is another block: not taken.
        return hasattr(sys.modules[cls.__module__], self.router)


def _hf(model: str) -> str:
    return f"transformers.models.{model}.modeling_{model}"


# DeepSeek-V3's router and block, copied by name into these models (transformers' modular
# files): same forward, same attribute names.
_DEEPSEEK_V3_LIKE = dict(routing=deepseek_routing, shared=("shared_experts",),
                         bias="gate.e_score_correction_bias")

ARCHITECTURES = (
    Architecture("Mixtral", "mixtral", _hf("mixtral"), "MixtralSparseMoeBlock", "MixtralTopKRouter",
                 softmax_routing),
    Architecture("Qwen2-MoE", "qwen2_moe", _hf("qwen2_moe"), "Qwen2MoeSparseMoeBlock",
                 "Qwen2MoeTopKRouter", softmax_routing,
                 shared=("shared_expert", "shared_expert_gate"), gated_shared=True),
    Architecture("Qwen3-MoE", "qwen3_moe", _hf("qwen3_moe"), "Qwen3MoeSparseMoeBlock",
                 "Qwen3MoeTopKRouter", softmax_routing),
    Architecture("DeepSeek-V3", "deepseek_v3", _hf("deepseek_v3"), "DeepseekV3MoE",
                 "DeepseekV3TopkRouter", **_DEEPSEEK_V3_LIKE, aliases=("sarvam_mla",)),
    # The four above first: error messages list them first.
    Architecture("MiniMax", "minimax", _hf("minimax"), "MiniMaxSparseMoeBlock", "MiniMaxTopKRouter",
                 softmax_routing),
    Architecture("Qwen3-Next", "qwen3_next", _hf("qwen3_next"), "Qwen3NextSparseMoeBlock",
                 "Qwen3NextTopKRouter", softmax_routing,
                 shared=("shared_expert", "shared_expert_gate"), gated_shared=True),
    Architecture("Qwen3.5-MoE", "qwen3_5_moe_text", _hf("qwen3_5_moe"), "Qwen3_5MoeSparseMoeBlock",
                 "Qwen3_5MoeTopKRouter", softmax_routing,
                 shared=("shared_expert", "shared_expert_gate"), gated_shared=True),
    Architecture("OLMoE", "olmoe", _hf("olmoe"), "OlmoeSparseMoeBlock", "OlmoeTopKRouter",
                 softmax_routing),
    Architecture("FlexOlmo", "flex_olmo", _hf("flex_olmo"), "FlexOlmoSparseMoeBlock",
                 "FlexOlmoTopKRouter", softmax_routing),
    Architecture("HunYuan-MoE-V1", "hunyuan_v1_moe", _hf("hunyuan_v1_moe"), "HunYuanMoEV1Moe",
                 "HunYuanMoEV1Gate", softmax_routing, shared=("shared_mlp",),
                 gate_weight="wg.weight"),
    Architecture("GLM-4-MoE", "glm4_moe", _hf("glm4_moe"), "Glm4MoeMoE", "Glm4MoeTopkRouter",
                 **_DEEPSEEK_V3_LIKE, aliases=("sarvam_moe",)),
    Architecture("GLM-4-MoE-Lite", "glm4_moe_lite", _hf("glm4_moe_lite"), "Glm4MoeLiteMoE",
                 "Glm4MoeLiteTopkRouter", **_DEEPSEEK_V3_LIKE),
    Architecture("dots.llm1", "dots1", _hf("dots1"), "Dots1MoE", "Dots1TopkRouter",
                 **_DEEPSEEK_V3_LIKE),
    Architecture("EXAONE-MoE", "exaone_moe", _hf("exaone_moe"), "ExaoneMoeSparseMoEBlock",
                 "ExaoneMoeTopkRouter", **_DEEPSEEK_V3_LIKE),
    Architecture("MiniMax-M2", "minimax_m2", _hf("minimax_m2"), "MiniMaxM2SparseMoeBlock",
                 "MiniMaxM2TopKRouter", minimax_m2_routing, bias="e_score_correction_bias"),
    Architecture("AFMoE", "afmoe", _hf("afmoe"), "AfmoeSparseMoeBlock", "AfmoeTokenChoiceRouter",
                 afmoe_routing, shared=("shared_experts",), gate="router",
                 gate_weight="gate.weight", bias="expert_bias"),
    # No norm_topk_prob: always renormalized (Qwen3-MoE's router with it fixed to True).
    Architecture("Qwen3-VL-MoE", "qwen3_vl_moe_text", _hf("qwen3_vl_moe"),
                 "Qwen3VLMoeTextSparseMoeBlock", "Qwen3VLMoeTextTopKRouter", softmax_routing),
    Architecture("Solar-Open", "solar_open", _hf("solar_open"), "SolarOpenMoE",
                 "SolarOpenTopkRouter", **_DEEPSEEK_V3_LIKE),
    Architecture("DeepSeek-V3.2", "deepseek_v32", _hf("deepseek_v32"), "DeepseekV32MoE",
                 "DeepseekV32TopkRouter", **_DEEPSEEK_V3_LIKE),
    Architecture("GLM-MoE-DSA", "glm_moe_dsa", _hf("glm_moe_dsa"), "GlmMoeDsaMoE",
                 "GlmMoeDsaTopkRouter", **_DEEPSEEK_V3_LIKE),
    Architecture("GLM-4V-MoE", "glm4v_moe_text", _hf("glm4v_moe"), "Glm4vMoeTextMoE",
                 "Glm4vMoeTextTopkRouter", **_DEEPSEEK_V3_LIKE),
    # DeepSeek-V3's, with the clamped SwiGLU (MoEConfig.swiglu_limit, read from the experts).
    Architecture("GLM-5-Next", "glm5_next_text", _hf("glm5_next"), "Glm5NextTextMoE",
                 "Glm5NextTextTopkRouter", **_DEEPSEEK_V3_LIKE),
    Architecture("DeepSeek-V2", "deepseek_v2", _hf("deepseek_v2"), "DeepseekV2Moe",
                 "DeepseekV2TopkRouter", deepseek_v2_routing, shared=("shared_experts",),
                 refuse=deepseek_v2_refuse),
    # Softmax over the top-k logits: the renormalized top-k softmax (norm_topk_prob is
    # read for sigmoid only). Shared experts only where num_shared_experts > 0.
    Architecture("Cohere2-MoE", "cohere2_moe", _hf("cohere2_moe"), "Cohere2MoeSparseMoeBlock",
                 "Cohere2MoeTopKRouter", softmax_routing_always_normalized,
                 shared=("shared_experts",), refuse=cohere2_moe_refuse),
    # Softmax, chosen with the [1, E] bias, renormalized by max(sum, moe_norm_min): see
    # ernie_refuse. Shared experts only where moe_num_shared_experts > 0.
    Architecture("ERNIE-4.5-MoE", "ernie4_5_moe", _hf("ernie4_5_moe"), "Ernie4_5_MoeSparseMoeBlock",
                 "Ernie4_5_MoeTopKRouter", softmax_routing_always_normalized,
                 shared=("shared_experts",), bias="gate.moe_statics.e_score_correction_bias",
                 bias_rows=True, refuse=ernie_refuse),
    # Qwen3-Omni-MoE's thinker (its language model): Qwen3-MoE's router and block. (Its
    # talker's, Qwen2-MoE's with the gated shared expert, are listed below.)
    Architecture("Qwen3-Omni-MoE (thinker)", "qwen3_omni_moe_text", _hf("qwen3_omni_moe"),
                 "Qwen3OmniMoeThinkerTextSparseMoeBlock", "Qwen3OmniMoeThinkerTextTopKRouter",
                 softmax_routing),
    # Never renormalized; the router at block.router.
    Architecture("Jamba", "jamba", _hf("jamba"), "JambaSparseMoeBlock", "JambaTopKRouter",
                 softmax_routing_never_normalized, gate="router"),
    Architecture("Kimi-Linear", "kimi_linear", _hf("kimi_linear"), "KimiLinearMoE",
                 "KimiLinearTopkRouter", **_DEEPSEEK_V3_LIKE),
    Architecture("Bailing-Hybrid", "bailing_hybrid", _hf("bailing_hybrid"), "BailingHybridMoE",
                 "BailingHybridTopkRouter", **_DEEPSEEK_V3_LIKE),
    # DeepSeek-V3's router, no shared experts.
    Architecture("MiMo-V2-Flash", "mimo_v2_flash", _hf("mimo_v2_flash"), "MiMoV2FlashMoE",
                 "MiMoV2FlashTopkRouter", deepseek_routing, bias="gate.e_score_correction_bias"),
    # MiniMax-M2's routing with the block's bias, scaled by the router's factor (AFMoE's).
    Architecture("HunYuan-V3", "hy_v3", _hf("hy_v3"), "HYV3MoE", "HYV3TopKRouter",
                 hy_v3_routing, shared=("shared_experts",), bias="e_score_correction_bias"),
    # Softmax, groups by their top-2 sum (the others zeroed): see mistral4_refuse.
    Architecture("Mistral-4", "mistral4", _hf("mistral4"), "Mistral4MoE", "Mistral4TopkRouter",
                 mistral4_routing, shared=("shared_experts",), refuse=mistral4_refuse),
    # Granite's four MoE families share one block: softmax over the top-k logits (Cohere2-MoE's
    # selection), router at block.router; their shared MLP is outside the block.
    *(Architecture(name, model_type, _hf(model_type), f"{prefix}MoE", f"{prefix}TopKRouter",
                   softmax_routing_always_normalized, gate="router")
      for name, model_type, prefix in (
          ("GraniteMoE", "granitemoe", "GraniteMoe"),
          ("GraniteMoE-Shared", "granitemoeshared", "GraniteMoeShared"),
          ("GraniteMoE-Hybrid", "granitemoehybrid", "GraniteMoeHybrid"),
          ("GraniteMoE-SWA", "granitemoe_swa", "GraniteMoeSWA"))),
    # Sigmoid + the router's frozen [E] bias Parameter, renormalized, times the block's
    # routed scale; see laguna_refuse.
    Architecture("Laguna", "laguna", _hf("laguna"), "LagunaSparseMoeBlock", "LagunaTopKRouter",
                 sigmoid_routing, shared=("shared_experts",),
                 bias="gate.e_score_correction_bias", refuse=laguna_refuse,
                 block_routing=laguna_block_routing),
    Architecture("Mellum", "mellum", _hf("mellum"), "MellumSparseMoeBlock", "MellumTopKRouter",
                 softmax_routing),
    # DeepSeek-V3's block and router, but groups zero the others' scores: see axk2_refuse.
    Architecture("A.X-K2", "axk2", _hf("axk2"), "AXK2MoE", "AXK2TopkRouter", axk2_routing,
                 shared=("shared_experts",), bias="gate.e_score_correction_bias",
                 refuse=axk2_refuse),
    # A plain (ungated) shared expert, at block.shared_expert.
    Architecture("Flint", "flint", _hf("flint"), "FlintSparseMoeBlock", "FlintTopKRouter",
                 sigmoid_routing, shared=("shared_expert",)),
    Architecture("Lara-Mini", "lara_mini", _hf("lara_mini"), "LaraMiniSparseMoeBlock",
                 "LaraMiniTopKRouter", softmax_routing, shared=("shared_expert",)),
    # Qwen3-Omni-MoE's talker: Qwen2-MoE's router and block, gated shared expert and all.
    Architecture("Qwen3-Omni-MoE (talker)", "qwen3_omni_moe_talker_text", _hf("qwen3_omni_moe"),
                 "Qwen3OmniMoeTalkerTextSparseMoeBlock", "Qwen3OmniMoeTalkerTextTopKRouter",
                 softmax_routing, shared=("shared_expert", "shared_expert_gate"),
                 gated_shared=True),
    # Qwen4-Exp's language model: Qwen2-MoE's router and block (its hyper-connections,
    # linear attention and n-gram embeddings are outside the block).
    Architecture("Qwen4-Exp", "qwen4_exp_text", _hf("qwen4_exp"), "Qwen4ExpTextSparseMoeBlock",
                 "Qwen4ExpTextTopKRouter", softmax_routing,
                 shared=("shared_expert", "shared_expert_gate"), gated_shared=True),
    # Mistral-Large-4's language model: Mistral-4's router with fp32 logits and no
    # norm_topk_prob (always renormalized); see mistral4_refuse.
    Architecture("Mistral-Large-4", "mistral_large4_text", _hf("mistral_large4"),
                 "MistralLarge4TextMoE", "MistralLarge4TextTopkRouter", mistral4_routing,
                 shared=("shared_experts",), refuse=mistral4_refuse),
    # dots3-note's language model: DeepSeek-V3's; its shared MLP is n_shared_experts *
    # shared_experts_intermediate_size wide.
    Architecture("dots3-note", "dots3_note_text", _hf("dots3_note"), "Dots3NoteTextMoE",
                 "Dots3NoteTextTopkRouter", **_DEEPSEEK_V3_LIKE),
    # DeepSeek-V3's, with the clamped SwiGLU in the routed experts only: the shared
    # experts (kept as the HF module) do not clamp.
    Architecture("HunYuan-V4", "hy_v4", _hf("hy_v4"), "HYV4MoE", "HYV4TopkRouter",
                 **_DEEPSEEK_V3_LIKE, unclamped_shared=True),
    Architecture("HunYuan-V4-VL", "hy_v4_vl_text", _hf("hy_v4_vl"), "HYV4VLMoE",
                 "HYV4VLTopkRouter", **_DEEPSEEK_V3_LIKE, unclamped_shared=True),
)


def supported() -> str:
    """'Mixtral (MixtralSparseMoeBlock), ...' for error messages. GPT-OSS's block is
    patched too, though not into a dsv3.MoE (gpt_oss.py)."""
    return ", ".join([f"{a.name} ({a.block})" for a in ARCHITECTURES] + ["GPT-OSS (GptOssMLP)"])


def architecture_of(block: nn.Module) -> Architecture | None:
    return next((a for a in ARCHITECTURES if a.matches(block)), None)


def architecture_for(model_type: str) -> Architecture:
    for arch in ARCHITECTURES:
        if model_type == arch.model_type or model_type in arch.aliases:
            return arch
    raise ValueError(f"hf_config: model_type {model_type!r} is not supported; supported "
                     f"architectures: {supported()}")
