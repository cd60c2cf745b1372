// Schemas of every dsv3 operator, in one place, so the CPU (csrc/cpu) and GPU
// (csrc/cuda, dsv3/kernels) implementations register against the same contract.
// Autograd formulas and fake (meta) implementations live in Python (dsv3/ops/),
// next to the input checks; the kernels here are raw and gradient-free.
#include <Python.h>
#include <torch/library.h>

#include "cpu/alloc.h"

TORCH_LIBRARY(dsv3, m) {
  // Top-k routing. weights_TK (fp32, or fp64 for fp64 logits), experts_TK (int32),
  // counts_E (int32). The bias only steers selection; weights come from the
  // unbiased scores (DeepSeek-V3's aux-loss-free balancing). With stats=True the
  // same pass also sums what the balance losses need: score_sum_E = sum over tokens
  // of the row-normalized scores, lse_sq_sum = sum over tokens of logsumexp(logits)^2
  // (both in the weights' dtype); with stats=False both are empty. With n_groups > 1,
  // only the topk_groups best groups' experts can be chosen, a group scored by
  // group_score: "top2_sum", the sum of its two best selection scores (DeepSeek-V3),
  // or "max", its best one (DeepSeek-V2's group_limited_greedy); ties to the lower index.
  m.def(
      "route(Tensor logits_TE, int top_k, str score, Tensor? bias_E, int n_groups, "
      "int topk_groups, bool normalize, float scale, bool stats, "
      "str group_score=\"top2_sum\") -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // d(logits) from any of d(weights_TK), d(score_sum_E), d(lse_sq_sum) (absent = zero).
  m.def(
      "route_backward(Tensor? grad_weights_TK, Tensor? grad_score_sum_E, "
      "Tensor? grad_lse_sq_sum, Tensor logits_TE, Tensor experts_TK, str score, "
      "bool normalize, float scale) -> Tensor");
  // Stable counting sort of routed copies by expert. Expert id -1 means "dropped":
  // those copies go after every expert's segment. offsets_E are cumulative ends.
  m.def("expert_index(Tensor experts_TK, int n_experts) -> (Tensor, Tensor)");
  // x_SD[row_map_TK[t, k]] = x_TD[t]
  m.def("permute_rows(Tensor x_TD, Tensor row_map_TK) -> Tensor");
  // y_TD[t] = sum_k weights_TK[t, k] * y_SD[row_map_TK[t, k]], k in order (deterministic)
  m.def("unpermute(Tensor y_SD, Tensor row_map_TK, Tensor? weights_TK) -> Tensor");
  m.def(
      "unpermute_backward(Tensor grad_y_TD, Tensor y_SD, Tensor row_map_TK, "
      "Tensor weights_TK) -> (Tensor, Tensor)");
  // y_SY[rows of expert e] = x_SX[rows of expert e] @ w_EXY[e]; rows past the last
  // offset (dropped copies) are zero.
  m.def("grouped_mm(Tensor x_SX, Tensor w_EXY, Tensor offsets_E) -> Tensor");
  // The permute fused into the GEMM's loads (ScatterMoE-style): row s of the input is
  // x_TX[token_S[s]], so the expert-ordered copy x_SX is never written. row_map_TK
  // (token_S's inverse, one row per copy) is what the backward sums d(x) through.
  m.def(
      "grouped_mm_gather(Tensor x_TX, Tensor w_EXY, Tensor offsets_E, Tensor token_S, "
      "Tensor row_map_TK) -> Tensor");
  // grad_w_EXY[e] = x_SX[rows of e]^T @ grad_y_SY[rows of e]; with transposed=True the
  // result is laid out [E, Y, X] (for weights stored as nn.Linear's [out, in]). With
  // token_S, x is x_TX and row s reads x_TX[token_S[s]] (the gathered GEMM's wgrad).
  m.def(
      "grouped_mm_wgrad(Tensor x_SX, Tensor grad_y_SY, Tensor offsets_E, bool transposed, "
      "Tensor? token_S=None) -> Tensor");
  // Block-wise int8 quantization for compressed gradient all-reduce (dsv3.distributed):
  // v = x_N + error_N (error feedback, optional); per block of block_size values
  // scale = max|v| / 127, q = v / scale rounded half away from zero; new_error_N is
  // what q * scale misses of v. Scales and errors are fp32.
  m.def(
      "quantize_int8(Tensor x_N, int block_size, Tensor? error_N) "
      "-> (Tensor q_N, Tensor scales_B, Tensor new_error_N)");
  // sum_N = sum over r (in order) of q_RN[r] * scales_RB[r] per block: R quantized
  // chunks dequantized and reduced in one pass (R = 1: plain dequantization).
  m.def("dequantize_int8(Tensor q_RN, Tensor scales_RB, int block_size) -> Tensor");
  // a_SF = silu(gate) * up with gate = h[:, :F], up = h[:, F:]. With a limit L > 0
  // (GLM-5-Next, DeepSeek-V4), first gate = min(gate, L) and up = clamp(up, -L, L) as
  // torch's clamp does (L rounded to h's dtype): the gradient of a clamped input is
  // zero, and of an input equal to +-L too unless grad_at_limit (as torch <= 2.12).
  m.def("swiglu(Tensor h_S2F, float? limit=None) -> Tensor");
  m.def(
      "swiglu_backward(Tensor grad_a_SF, Tensor h_S2F, float? limit=None, "
      "bool grad_at_limit=False) -> Tensor");
  // GPT-OSS's gated activation: a_SF = gate * sigmoid(alpha * gate) * (up + 1) with gate
  // and up INTERLEAVED, gate = h[:, 0::2], up = h[:, 1::2]. With a limit L > 0, first
  // gate = min(gate, L) and up = clamp(up, -L, L) as torch's clamp does, with the
  // gradients at and past the bounds as swiglu's. grad_h_S2F is interleaved like h.
  m.def("gpt_oss_glu(Tensor h_S2F, float alpha, float? limit=None) -> Tensor");
  m.def(
      "gpt_oss_glu_backward(Tensor grad_a_SF, Tensor h_S2F, float alpha, float? limit=None, "
      "bool grad_at_limit=False) -> Tensor");
  // Biased expert projections: out_SN = y_SN + bias_EN[e] on expert e's rows
  // [offsets_E[e-1], offsets_E[e]) (rows past the last offset unchanged), and the bias
  // gradient, each expert's rows summed (fp32 accumulation; zeros for an expert
  // without rows). CPU kernels only: on a GPU the op is composed of torch ops and the
  // grouped GEMM's wgrad (dsv3/ops/expert_bias.py).
  m.def("add_expert_bias(Tensor y_SN, Tensor bias_EN, Tensor offsets_E) -> Tensor");
  m.def("expert_row_sums(Tensor grad_SN, Tensor offsets_E) -> Tensor");
}

namespace {
// Frees the CPU kernels' cached output buffers (csrc/cpu/alloc.h), like
// torch.cuda.empty_cache() does for CUDA's caching allocator.
int64_t release_cached_memory() { return static_cast<int64_t>(dsv3::OutputCache::instance().release()); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(dsv3, m) { m.def("release_cached_memory() -> int", &release_cached_memory); }

// `import dsv3._C` loads this library and so runs the registrations above; the
// module itself carries no Python functions.
static struct PyModuleDef dsv3_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&dsv3_module); }
