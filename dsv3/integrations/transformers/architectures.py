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
  and moe_norm_min (_ernie_refuse). Checked on the bias' values when converting: a bias
  still on the meta device is refused, and one loaded into a patched model afterwards
  is not checked again. Refused otherwise (ERNIE-4.5's own moe_norm_min, 1e-12, passes
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
+1e-6), LongCat-Flash (identity experts, no renormalization), ERNIE-4.5-VL-MoE (its
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
dsv3 through ``experts_implementation="dsv3"`` (experts.CLAMPED_SWIGLU_EXPERTS).

Blocks are matched by exact class (module and name), never by isinstance: a subclass
in another model may change the forward, and we would silently compute the wrong thing.
The block's module must also define the router class it is listed with: transformers
5.17's JambaSparseMoeBlock (same module, same name) routes through a plain nn.Linear
and has no JambaTopKRouter, and is not taken.
"""
import importlib
import math
import sys
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


def _softmax_routing(router: nn.Module) -> dict:
    # Routers without norm_topk_prob (Mixtral, MiniMax, HunYuan, Qwen3-VL-MoE, Qwen3.5-MoE)
    # always renormalize.
    return {"score": "softmax", "normalize_weights": bool(getattr(router, "norm_topk_prob", True))}


def _softmax_routing_always_normalized(router: nn.Module) -> dict:
    return {"score": "softmax", "normalize_weights": True}


def _softmax_routing_never_normalized(router: nn.Module) -> dict:
    return {"score": "softmax", "normalize_weights": False}


def _sigmoid_routing(router: nn.Module) -> dict:
    # Flint: renormalized iff norm_topk_prob; Laguna's router (no norm_topk_prob) always.
    return {"score": "sigmoid", "normalize_weights": bool(getattr(router, "norm_topk_prob", True))}


def _hy_v3_routing(router: nn.Module) -> dict:
    return {"score": "sigmoid", "route_scale": float(router.router_scaling_factor),
            "normalize_weights": True}


def _mistral4_routing(router: nn.Module) -> dict:
    # Mistral-Large-4's router has no norm_topk_prob: always renormalized.
    return {"score": "softmax", "n_groups": router.num_group, "topk_groups": router.topk_group,
            "group_score": "top2_sum", "route_scale": float(router.routed_scaling_factor),
            "normalize_weights": bool(getattr(router, "norm_topk_prob", True))}


def _deepseek_routing(router: nn.Module) -> dict:
    return {"score": "sigmoid", "n_groups": router.num_group, "topk_groups": router.topk_group,
            "route_scale": float(router.routed_scaling_factor),
            "normalize_weights": bool(router.norm_topk_prob)}


def _minimax_m2_routing(router: nn.Module) -> dict:
    return {"score": "sigmoid", "normalize_weights": True}  # no groups, no scale


def _afmoe_routing(router: nn.Module) -> dict:
    return {"score": "sigmoid", "route_scale": float(router.route_scale), "normalize_weights": True}


def _deepseek_v2_limits_groups(router: nn.Module) -> bool:
    """group_limited_greedy with some group left out (all kept: greedy)."""
    # A missing n_group counts as limiting, so that the refusal below names it (None ==
    # None would pass for "every group kept").
    return router.topk_method == "group_limited_greedy" and (
        router.num_group is None or router.topk_group != router.num_group)


def _deepseek_v2_routing(router: nn.Module) -> dict:
    # Never renormalized: transformers' DeepseekV2TopkRouter ignores norm_topk_prob.
    routing = {"score": "softmax", "route_scale": float(router.routed_scaling_factor),
               "normalize_weights": False}
    if _deepseek_v2_limits_groups(router):  # a group scored by its best expert
        routing |= {"n_groups": router.num_group, "topk_groups": router.topk_group,
                    "group_score": "max"}
    return routing


def _deepseek_v2_refuse(block: nn.Module) -> tuple[str, str] | None:
    router = block.gate
    method = router.topk_method
    if method not in ("greedy", "group_limited_greedy"):
        return (f"topk_method={method!r}",
                "transformers computes only 'greedy' and 'group_limited_greedy'")
    if not _deepseek_v2_limits_groups(router):
        return None
    n_group, topk_group, n_experts = router.num_group, router.topk_group, router.num_experts
    setting = f"topk_method={method!r} (n_group={n_group}, topk_group={topk_group})"
    if not (isinstance(n_group, int) and isinstance(topk_group, int) and 1 <= topk_group
            < n_group and n_experts % n_group == 0):
        return (setting, f"transformers' router cannot keep topk_group of n_group groups of "
                         f"its {n_experts} experts")
    if router.top_k > topk_group * (n_experts // n_group):
        return (setting + f" with top_k={router.top_k}",
                "top_k is above the kept groups' experts, which transformers fills with other "
                "groups' experts at weight 0; dsv3.MoE chooses in the kept groups only")
    return None


def _cohere2_moe_refuse(block: nn.Module) -> tuple[str, str] | None:
    selection = block.gate.expert_selection_fn
    if selection != "softmax":
        return (f"expert_selection_fn={selection!r}",
                "it picks the top-k logits, dsv3.MoE the top-k scores, and fp32 sigmoid maps "
                "plainly different large logits to the same score (1.0 above ~16.6), where "
                "dsv3.MoE picks the lower expert index")
    combination = block.shared_expert_combination_strategy
    if block.num_shared_experts > 0 and combination != "sum":
        return (f"shared_expert_combination_strategy={combination!r}",
                "it returns (routed + shared) / 2, dsv3.MoE routed + shared")
    return None


def _ernie_refuse(block: nn.Module) -> tuple[str, str] | None:
    """ERNIE-4.5-MoE renormalizes by max(sum, moe_norm_min), dsv3.MoE by the sum (+1e-20,
    below the sum's ulp): the same while the chosen weights' sum is >= moe_norm_min. The
    experts are chosen on softmax + bias, so the sum has no floor of its own (a bias can
    choose experts of tiny probability). With R the bias' range (max - min) and
    moe_norm_min + R <= 1/(2E), every chosen expert is the most probable one (p >= 1/E)
    or one that outranks it, so p >= 1/E - R >= 1/(2E) + moe_norm_min: the sum is above
    both moe_norm_min and 1/(2E). R carries 2^-20 of the bias' magnitude on top, for
    the rounding of p + bias; the factor 2 is room for the softmax's."""
    router = block.gate
    norm_min = router.norm_min
    setting = f"moe_norm_min={norm_min!r}"
    if isinstance(norm_min, bool) or not isinstance(norm_min, (int, float)):
        return setting, "moe_norm_min is not a number"
    bias = router.moe_statics.e_score_correction_bias
    if bias.is_meta:
        return (setting + " and a selection bias on the meta device",
                "whether the clamp at moe_norm_min can act depends on the bias' values; "
                "convert the block once they are loaded")
    bias = bias.detach().float()
    spread = (bias.max() - bias.min()).item() + 2.0 ** -20 * max(1.0, bias.abs().max().item())
    bound = 1.0 / (2 * bias.numel())
    if not norm_min + spread <= bound:  # also false for a NaN norm_min or bias
        return (setting, f"transformers divides the chosen weights by moe_norm_min where their "
                         f"sum is smaller, dsv3.MoE by the sum; accepted while moe_norm_min + "
                         f"the selection bias' range is at most 1/(2 * num_experts) = "
                         f"{bound:.4g} (here {norm_min + spread:.4g}), which keeps the sum "
                         f"above moe_norm_min")
    return None


def _axk2_routing(router: nn.Module) -> dict:
    # Without n_group (A.X-K2-Light) DeepSeek-V3's router without groups; every group kept is
    # the same (_axk2_refuse takes nothing else).
    return {"score": "sigmoid", "route_scale": float(router.routed_scaling_factor),
            "normalize_weights": bool(router.norm_topk_prob)}


def _axk2_refuse(block: nn.Module) -> tuple[str, str] | None:
    router = block.gate
    if router.num_group is None or router.topk_group == router.num_group:
        return None
    return (f"n_group={router.num_group}, topk_group={router.topk_group}",
            "it sets the left-out groups' selection scores (sigmoid + bias) to 0, which a "
            "kept expert's score + a negative bias falls below; dsv3.MoE never chooses them")


def _mistral4_refuse(block: nn.Module) -> tuple[str, str] | None:
    """Mistral-4 scores a group by the sum of its two best softmax scores and sets the
    other groups' scores to 0 (not -inf) before its top-k: dsv3.MoE's group-limited
    softmax routing (group_score "top2_sum") while the top-k fits in the kept groups (a
    softmax score is > 0, so a kept expert outranks every zeroed one)."""
    router = block.gate
    n_group, topk_group, n_experts = router.num_group, router.topk_group, router.num_experts
    setting = f"n_group={n_group}, topk_group={topk_group}"
    if not (isinstance(n_group, int) and isinstance(topk_group, int) and 1 <= topk_group
            <= n_group and n_experts % n_group == 0 and n_experts // n_group >= 2):
        return (setting, f"transformers' router cannot keep topk_group of n_group groups of "
                         f"its {n_experts} experts scored by their two best")
    if router.top_k > topk_group * (n_experts // n_group):
        return (setting + f" with top_k={router.top_k}",
                "top_k is above the kept groups' experts, which transformers fills with other "
                "groups' experts at weight 0; dsv3.MoE chooses in the kept groups only")
    return None


def _laguna_refuse(block: nn.Module) -> tuple[str, str] | None:
    softcap = block.gate.router_logit_softcapping
    if softcap != 0.0:
        return (f"moe_router_logit_softcapping={softcap!r}",
                "it routes on tanh-softcapped logits; dsv3.MoE on the logits")
    scale = block.routed_scaling_factor
    if (isinstance(scale, bool) or not isinstance(scale, (int, float))
            or not math.isfinite(scale) or scale <= 0):
        # The scale multiplies the routed output: dsv3.MoE's route_scale, which is > 0.
        return (f"moe_routed_scaling_factor={scale!r}",
                "it scales the routed output by it, dsv3.MoE by a route_scale that is a "
                "finite number > 0")
    return None


def _laguna_block_routing(block: nn.Module) -> dict:
    # (sum_k w_k expert_k(x)) * s, the block's: dsv3.MoE's route_scale s on the weights.
    return {"route_scale": float(block.routed_scaling_factor)}


def _hf(model: str) -> str:
    return f"transformers.models.{model}.modeling_{model}"


# DeepSeek-V3's router and block, copied by name into these models (transformers' modular
# files): same forward, same attribute names.
_DEEPSEEK_V3_LIKE = dict(routing=_deepseek_routing, shared=("shared_experts",),
                         bias="gate.e_score_correction_bias")

ARCHITECTURES = (
    Architecture("Mixtral", "mixtral", _hf("mixtral"), "MixtralSparseMoeBlock", "MixtralTopKRouter",
                 _softmax_routing),
    Architecture("Qwen2-MoE", "qwen2_moe", _hf("qwen2_moe"), "Qwen2MoeSparseMoeBlock",
                 "Qwen2MoeTopKRouter", _softmax_routing,
                 shared=("shared_expert", "shared_expert_gate"), gated_shared=True),
    Architecture("Qwen3-MoE", "qwen3_moe", _hf("qwen3_moe"), "Qwen3MoeSparseMoeBlock",
                 "Qwen3MoeTopKRouter", _softmax_routing),
    Architecture("DeepSeek-V3", "deepseek_v3", _hf("deepseek_v3"), "DeepseekV3MoE",
                 "DeepseekV3TopkRouter", **_DEEPSEEK_V3_LIKE, aliases=("sarvam_mla",)),
    # The four above first: error messages list them first.
    Architecture("MiniMax", "minimax", _hf("minimax"), "MiniMaxSparseMoeBlock", "MiniMaxTopKRouter",
                 _softmax_routing),
    Architecture("Qwen3-Next", "qwen3_next", _hf("qwen3_next"), "Qwen3NextSparseMoeBlock",
                 "Qwen3NextTopKRouter", _softmax_routing,
                 shared=("shared_expert", "shared_expert_gate"), gated_shared=True),
    Architecture("Qwen3.5-MoE", "qwen3_5_moe_text", _hf("qwen3_5_moe"), "Qwen3_5MoeSparseMoeBlock",
                 "Qwen3_5MoeTopKRouter", _softmax_routing,
                 shared=("shared_expert", "shared_expert_gate"), gated_shared=True),
    Architecture("OLMoE", "olmoe", _hf("olmoe"), "OlmoeSparseMoeBlock", "OlmoeTopKRouter",
                 _softmax_routing),
    Architecture("FlexOlmo", "flex_olmo", _hf("flex_olmo"), "FlexOlmoSparseMoeBlock",
                 "FlexOlmoTopKRouter", _softmax_routing),
    Architecture("HunYuan-MoE-V1", "hunyuan_v1_moe", _hf("hunyuan_v1_moe"), "HunYuanMoEV1Moe",
                 "HunYuanMoEV1Gate", _softmax_routing, shared=("shared_mlp",),
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
                 "MiniMaxM2TopKRouter", _minimax_m2_routing, bias="e_score_correction_bias"),
    Architecture("AFMoE", "afmoe", _hf("afmoe"), "AfmoeSparseMoeBlock", "AfmoeTokenChoiceRouter",
                 _afmoe_routing, shared=("shared_experts",), gate="router",
                 gate_weight="gate.weight", bias="expert_bias"),
    # No norm_topk_prob: always renormalized (Qwen3-MoE's router with it fixed to True).
    Architecture("Qwen3-VL-MoE", "qwen3_vl_moe_text", _hf("qwen3_vl_moe"),
                 "Qwen3VLMoeTextSparseMoeBlock", "Qwen3VLMoeTextTopKRouter", _softmax_routing),
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
                 "DeepseekV2TopkRouter", _deepseek_v2_routing, shared=("shared_experts",),
                 refuse=_deepseek_v2_refuse),
    # Softmax over the top-k logits: the renormalized top-k softmax (norm_topk_prob is
    # read for sigmoid only). Shared experts only where num_shared_experts > 0.
    Architecture("Cohere2-MoE", "cohere2_moe", _hf("cohere2_moe"), "Cohere2MoeSparseMoeBlock",
                 "Cohere2MoeTopKRouter", _softmax_routing_always_normalized,
                 shared=("shared_experts",), refuse=_cohere2_moe_refuse),
    # Softmax, chosen with the [1, E] bias, renormalized by max(sum, moe_norm_min): see
    # _ernie_refuse. Shared experts only where moe_num_shared_experts > 0.
    Architecture("ERNIE-4.5-MoE", "ernie4_5_moe", _hf("ernie4_5_moe"), "Ernie4_5_MoeSparseMoeBlock",
                 "Ernie4_5_MoeTopKRouter", _softmax_routing_always_normalized,
                 shared=("shared_experts",), bias="gate.moe_statics.e_score_correction_bias",
                 bias_rows=True, refuse=_ernie_refuse),
    # Qwen3-Omni-MoE's thinker (its language model): Qwen3-MoE's router and block. (Its
    # talker's, Qwen2-MoE's with the gated shared expert, are listed below.)
    Architecture("Qwen3-Omni-MoE (thinker)", "qwen3_omni_moe_text", _hf("qwen3_omni_moe"),
                 "Qwen3OmniMoeThinkerTextSparseMoeBlock", "Qwen3OmniMoeThinkerTextTopKRouter",
                 _softmax_routing),
    # Never renormalized; the router at block.router.
    Architecture("Jamba", "jamba", _hf("jamba"), "JambaSparseMoeBlock", "JambaTopKRouter",
                 _softmax_routing_never_normalized, gate="router"),
    Architecture("Kimi-Linear", "kimi_linear", _hf("kimi_linear"), "KimiLinearMoE",
                 "KimiLinearTopkRouter", **_DEEPSEEK_V3_LIKE),
    Architecture("Bailing-Hybrid", "bailing_hybrid", _hf("bailing_hybrid"), "BailingHybridMoE",
                 "BailingHybridTopkRouter", **_DEEPSEEK_V3_LIKE),
    # DeepSeek-V3's router, no shared experts.
    Architecture("MiMo-V2-Flash", "mimo_v2_flash", _hf("mimo_v2_flash"), "MiMoV2FlashMoE",
                 "MiMoV2FlashTopkRouter", _deepseek_routing, bias="gate.e_score_correction_bias"),
    # MiniMax-M2's routing with the block's bias, scaled by the router's factor (AFMoE's).
    Architecture("HunYuan-V3", "hy_v3", _hf("hy_v3"), "HYV3MoE", "HYV3TopKRouter",
                 _hy_v3_routing, shared=("shared_experts",), bias="e_score_correction_bias"),
    # Softmax, groups by their top-2 sum (the others zeroed): see _mistral4_refuse.
    Architecture("Mistral-4", "mistral4", _hf("mistral4"), "Mistral4MoE", "Mistral4TopkRouter",
                 _mistral4_routing, shared=("shared_experts",), refuse=_mistral4_refuse),
    # Granite's four MoE families share one block: softmax over the top-k logits (Cohere2-MoE's
    # selection), router at block.router; their shared MLP is outside the block.
    *(Architecture(name, model_type, _hf(model_type), f"{prefix}MoE", f"{prefix}TopKRouter",
                   _softmax_routing_always_normalized, gate="router")
      for name, model_type, prefix in (
          ("GraniteMoE", "granitemoe", "GraniteMoe"),
          ("GraniteMoE-Shared", "granitemoeshared", "GraniteMoeShared"),
          ("GraniteMoE-Hybrid", "granitemoehybrid", "GraniteMoeHybrid"),
          ("GraniteMoE-SWA", "granitemoe_swa", "GraniteMoeSWA"))),
    # Sigmoid + the router's frozen [E] bias Parameter, renormalized, times the block's
    # routed scale; see _laguna_refuse.
    Architecture("Laguna", "laguna", _hf("laguna"), "LagunaSparseMoeBlock", "LagunaTopKRouter",
                 _sigmoid_routing, shared=("shared_experts",),
                 bias="gate.e_score_correction_bias", refuse=_laguna_refuse,
                 block_routing=_laguna_block_routing),
    Architecture("Mellum", "mellum", _hf("mellum"), "MellumSparseMoeBlock", "MellumTopKRouter",
                 _softmax_routing),
    # DeepSeek-V3's block and router, but groups zero the others' scores: see _axk2_refuse.
    Architecture("A.X-K2", "axk2", _hf("axk2"), "AXK2MoE", "AXK2TopkRouter", _axk2_routing,
                 shared=("shared_experts",), bias="gate.e_score_correction_bias",
                 refuse=_axk2_refuse),
    # A plain (ungated) shared expert, at block.shared_expert.
    Architecture("Flint", "flint", _hf("flint"), "FlintSparseMoeBlock", "FlintTopKRouter",
                 _sigmoid_routing, shared=("shared_expert",)),
    Architecture("Lara-Mini", "lara_mini", _hf("lara_mini"), "LaraMiniSparseMoeBlock",
                 "LaraMiniTopKRouter", _softmax_routing, shared=("shared_expert",)),
    # Qwen3-Omni-MoE's talker: Qwen2-MoE's router and block, gated shared expert and all.
    Architecture("Qwen3-Omni-MoE (talker)", "qwen3_omni_moe_talker_text", _hf("qwen3_omni_moe"),
                 "Qwen3OmniMoeTalkerTextSparseMoeBlock", "Qwen3OmniMoeTalkerTextTopKRouter",
                 _softmax_routing, shared=("shared_expert", "shared_expert_gate"),
                 gated_shared=True),
    # Qwen4-Exp's language model: Qwen2-MoE's router and block (its hyper-connections,
    # linear attention and n-gram embeddings are outside the block).
    Architecture("Qwen4-Exp", "qwen4_exp_text", _hf("qwen4_exp"), "Qwen4ExpTextSparseMoeBlock",
                 "Qwen4ExpTextTopKRouter", _softmax_routing,
                 shared=("shared_expert", "shared_expert_gate"), gated_shared=True),
    # Mistral-Large-4's language model: Mistral-4's router with fp32 logits and no
    # norm_topk_prob (always renormalized); see _mistral4_refuse.
    Architecture("Mistral-Large-4", "mistral_large4_text", _hf("mistral_large4"),
                 "MistralLarge4TextMoE", "MistralLarge4TextTopkRouter", _mistral4_routing,
                 shared=("shared_experts",), refuse=_mistral4_refuse),
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
