// Fused top-k router on the CPU: one pass over each token's logits computes the
// scores, the (group-limited) selection, the weights, a NaN check and, when asked,
// the sums the balance losses need (score_sum_E, lse_sq_sum), so no second pass
// over logits_TE is needed. OpenMP over fixed chunks of tokens: the loss sums are
// reduced chunk by chunk in order, so they are the same for any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "route_rows.h"
#include "vec_math.h"

namespace dsv3 {
namespace {

enum class Score { Softmax, Sigmoid };

Score parse_score(c10::string_view score) {
  if (score == "softmax") return Score::Softmax;
  if (score == "sigmoid") return Score::Sigmoid;
  TORCH_CHECK_VALUE(false, "route: score must be 'softmax' or 'sigmoid', got '", score, "'");
}

// How a group is scored for group-limited selection: the sum of its two best selection
// scores (DeepSeek-V3) or its best one (DeepSeek-V2's group_limited_greedy).
enum class GroupScore { Top2Sum, Max };

GroupScore parse_group_score(c10::string_view group_score) {
  if (group_score == "top2_sum") return GroupScore::Top2Sum;
  if (group_score == "max") return GroupScore::Max;
  TORCH_CHECK_VALUE(false, "route: group_score must be 'top2_sum' or 'max', got '", group_score,
                    "'");
}

// Fills prob_E with softmax or sigmoid of one token's logits, and *lse (when lse is
// not null) with log(sum exp(logits)); returns false on NaN or +inf (which would turn
// the softmax into NaN); -inf is a legal "never" logit. Float math (fp32, fp16, bf16
// logits) goes through route_rows' vectorized rows, widened into row_buffer; fp64
// stays with std::exp.
template <typename scalar_t, typename acc_t>
bool token_scores(const scalar_t* logits_E, int64_t n_experts, Score score, acc_t* prob_E,
                  acc_t* lse, acc_t* row_buffer) {
  if constexpr (std::is_same_v<acc_t, float>) {
    const float* row = vec::as_float(logits_E, row_buffer, n_experts);
    if (score == Score::Softmax) {
      float row_lse;
      const bool usable = route_rows::softmax(row, n_experts, prob_E, &row_lse);
      if (lse) *lse = row_lse;
      return usable;
    }
    if (lse) *lse = route_rows::logsumexp(row, n_experts);
    return route_rows::sigmoid(row, n_experts, prob_E);
  } else {
    bool finite = true;
    for (int64_t e = 0; e < n_experts; ++e) {
      const acc_t l = static_cast<acc_t>(logits_E[e]);
      finite &= !std::isnan(l) && l != std::numeric_limits<acc_t>::infinity();
    }
    acc_t max_logit = -std::numeric_limits<acc_t>::infinity();
    for (int64_t e = 0; e < n_experts; ++e)
      max_logit = std::max(max_logit, static_cast<acc_t>(logits_E[e]));
    acc_t total = 0;  // sum exp(l - max): the softmax's and the lse's
    for (int64_t e = 0; e < n_experts; ++e) {
      const acc_t shifted = std::exp(static_cast<acc_t>(logits_E[e]) - max_logit);
      total += shifted;
      if (score == Score::Softmax) prob_E[e] = shifted;
    }
    if (score == Score::Softmax)
      for (int64_t e = 0; e < n_experts; ++e) prob_E[e] /= total;
    else
      for (int64_t e = 0; e < n_experts; ++e)
        prob_E[e] = acc_t(1) / (acc_t(1) + std::exp(-static_cast<acc_t>(logits_E[e])));
    if (lse)
      *lse = max_logit == -std::numeric_limits<acc_t>::infinity() ? max_logit
                                                                  : max_logit + std::log(total);
    return finite;
  }
}

// Tokens per chunk of the parallel loop. Fixed (not derived from the thread count)
// so the per-chunk loss sums, added in chunk order, are bitwise reproducible.
constexpr int64_t kTokensPerChunk = 64;

template <typename scalar_t>
void route_kernel(const at::Tensor& logits_TE, int64_t top_k, Score score,
                  const c10::optional<at::Tensor>& bias_E, int64_t n_groups, int64_t topk_groups,
                  GroupScore group_score_kind, bool normalize, double scale,
                  at::Tensor& weights_TK, at::Tensor& experts_TK, at::Tensor* partial_sums_CX) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_tokens = logits_TE.size(0), n_experts = logits_TE.size(1);
  const route_rows::Groups groups{n_groups, topk_groups, group_score_kind == GroupScore::Top2Sum};
  const scalar_t* logits = logits_TE.const_data_ptr<scalar_t>();
  at::Tensor bias_acc;
  if (bias_E.has_value()) {
    bias_acc = bias_E->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* values = bias_acc.const_data_ptr<acc_t>();
    for (int64_t e = 0; e < n_experts; ++e)
      TORCH_CHECK_VALUE(std::isfinite(values[e]), "route: bias_E must be finite, got ", values[e],
                        " for expert ", e);
  }
  const acc_t* bias = bias_E.has_value() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
  acc_t* weights = weights_TK.mutable_data_ptr<acc_t>();
  int32_t* experts = experts_TK.mutable_data_ptr<int32_t>();
  // Row c of partial_sums_CX: chunk c's score sums per expert, then its lse^2 sum.
  acc_t* partial = partial_sums_CX ? partial_sums_CX->mutable_data_ptr<acc_t>() : nullptr;
  std::atomic<int64_t> nan_token{-1};
  const int64_t n_chunks = (n_tokens + kTokensPerChunk - 1) / kTokensPerChunk;

  at::parallel_for(0, n_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<acc_t> prob_E(n_experts), selection_E(n_experts), row_buffer(n_experts);
    std::vector<acc_t> scratch(route_rows::scratch_values(n_experts, groups));
    std::vector<int32_t> slots(route_rows::scratch_slots(groups));
    for (int64_t t = chunk_begin * kTokensPerChunk;
         t < std::min(n_tokens, chunk_end * kTokensPerChunk); ++t) {
      acc_t lse = 0;  // set by token_scores when the loss sums are wanted
      if (!token_scores(logits + t * n_experts, n_experts, score, prob_E.data(),
                        partial ? &lse : nullptr, row_buffer.data())) {
        nan_token.store(t);
        continue;
      }
      if (partial) {
        acc_t* sums = partial + (t / kTokensPerChunk) * (n_experts + 1);
        acc_t row_total = 0;  // softmax rows sum to 1; sigmoid rows are normalized here
        for (int64_t e = 0; e < n_experts; ++e) row_total += prob_E[e];
        const acc_t inv_total = score == Score::Softmax ? acc_t(1) : acc_t(1) / row_total;
        for (int64_t e = 0; e < n_experts; ++e) sums[e] += prob_E[e] * inv_total;
        sums[n_experts] += lse * lse;
      }
      const acc_t* choice_E = prob_E.data();
      if (bias) {
        for (int64_t e = 0; e < n_experts; ++e) selection_E[e] = prob_E[e] + bias[e];
        choice_E = selection_E.data();
      }
      int32_t* chosen = experts + t * top_k;
      route_rows::select_experts(choice_E, n_experts, groups, top_k, scratch.data(),
                                 slots.data(), chosen);
      acc_t total = 0;
      for (int64_t k = 0; k < top_k; ++k) {
        weights[t * top_k + k] = prob_E[chosen[k]];
        total += prob_E[chosen[k]];
      }
      // The 1e-20 keeps an all-zero sigmoid row finite (as DeepSeek-V3 does).
      const acc_t factor = normalize ? acc_t(scale) / (total + acc_t(1e-20)) : acc_t(scale);
      for (int64_t k = 0; k < top_k; ++k) weights[t * top_k + k] *= factor;
    }
  });
  const int64_t bad = nan_token.load();
  TORCH_CHECK_VALUE(bad < 0, "route: logits_TE contains NaN or +inf (token ", bad, ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cpu(
    const at::Tensor& logits_TE_in, int64_t top_k, c10::string_view score_name,
    const c10::optional<at::Tensor>& bias_E, int64_t n_groups, int64_t topk_groups, bool normalize,
    double scale, bool stats, c10::string_view group_score_name) {
  const Score score = parse_score(score_name);
  const GroupScore group_score = parse_group_score(group_score_name);
  TORCH_CHECK_VALUE(logits_TE_in.dim() == 2, "route: logits_TE must be 2-D [T, E]");
  const at::Tensor logits_TE = logits_TE_in.contiguous();
  const int64_t n_tokens = logits_TE.size(0), n_experts = logits_TE.size(1);
  TORCH_CHECK_VALUE(n_groups >= 1 && n_experts % n_groups == 0,
                    "route: n_groups must divide n_experts");
  TORCH_CHECK_VALUE(topk_groups >= 1 && topk_groups <= n_groups,
                    "route: topk_groups must be in [1, n_groups]");
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= topk_groups * (n_experts / n_groups),
                    "route: top_k must be in [1, experts in the selected groups]");
  // The kernel reads bias_E[e] for every expert: a shorter bias would be read past its end.
  TORCH_CHECK_VALUE(!bias_E.has_value() || (bias_E->dim() == 1 && bias_E->size(0) == n_experts),
                    "route: bias_E must be 1-D [E=", n_experts, "], got ",
                    bias_E.has_value() ? bias_E->sizes() : at::IntArrayRef());
  const auto acc_type = logits_TE.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor weights_TK = at::empty({n_tokens, top_k}, logits_TE.options().dtype(acc_type));
  at::Tensor experts_TK = at::empty({n_tokens, top_k}, logits_TE.options().dtype(at::kInt));
  const int64_t n_chunks = (n_tokens + kTokensPerChunk - 1) / kTokensPerChunk;
  at::Tensor partial_sums_CX =
      stats ? at::zeros({n_chunks, n_experts + 1}, weights_TK.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits_TE.scalar_type(), "route", [&] {
    route_kernel<scalar_t>(logits_TE, top_k, score, bias_E, n_groups, topk_groups, group_score,
                           normalize, scale, weights_TK, experts_TK,
                           stats ? &partial_sums_CX : nullptr);
  });
  at::Tensor score_sum_E = at::empty({0}, weights_TK.options());
  at::Tensor lse_sq_sum = at::empty({0}, weights_TK.options());
  if (stats) {
    // Chunk order, one thread: the same sums for any thread count.
    at::Tensor sums_X = at::zeros({n_experts + 1}, weights_TK.options());
    AT_DISPATCH_FLOATING_TYPES(sums_X.scalar_type(), "route_stats", [&] {
      const scalar_t* partial = partial_sums_CX.const_data_ptr<scalar_t>();
      scalar_t* sums = sums_X.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < n_chunks; ++c)
        for (int64_t x = 0; x <= n_experts; ++x) sums[x] += partial[c * (n_experts + 1) + x];
    });
    score_sum_E = sums_X.narrow(0, 0, n_experts).clone();
    lse_sq_sum = sums_X[n_experts].clone();
  }
  at::Tensor counts_E = at::zeros({n_experts}, experts_TK.options());
  int32_t* counts = counts_E.mutable_data_ptr<int32_t>();
  const int32_t* experts = experts_TK.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < n_tokens * top_k; ++i) ++counts[experts[i]];
  return {weights_TK, experts_TK, counts_E, score_sum_E, lse_sq_sum};
}

// d(weights), d(score_sum_E), d(lse_sq_sum) -> d(logits), each term optional.
// Weights: with p the scores, s the sum of the selected ones and g = dL/dw,
// normalized weights w_k = scale * p_k / s give
//   dL/dp_k = scale / s * (g_k - sum_j g_j p_j / s), else dL/dp_k = scale * g_k.
// Score sums: q = p / sum(p) summed over tokens, so with h = dL/d(score_sum_E)
//   dL/dp_e = (h_e - sum_j h_j q_j) / sum(p) (for softmax sum(p) = 1).
// Then softmax: dL/dl_e = p_e * (dL/dp_e - sum_j dL/dp_j p_j); sigmoid: dL/dp_e p_e (1 - p_e).
// z: d(lse^2)/dl_e = 2 lse softmax(l)_e, whatever the score function.
template <typename scalar_t>
void route_backward_kernel(const at::Tensor* grad_weights_TK, const at::Tensor* grad_score_sum_E,
                           const at::Tensor* grad_lse_sq_sum, const at::Tensor& logits_TE,
                           const at::Tensor& experts_TK, Score score, bool normalize, double scale,
                           at::Tensor& grad_logits_TE) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_tokens = logits_TE.size(0), n_experts = logits_TE.size(1);
  const int64_t top_k = experts_TK.size(1);
  const scalar_t* logits = logits_TE.const_data_ptr<scalar_t>();
  const int32_t* experts = experts_TK.const_data_ptr<int32_t>();
  const acc_t* grad_w = grad_weights_TK ? grad_weights_TK->const_data_ptr<acc_t>() : nullptr;
  const acc_t* grad_sum = grad_score_sum_E ? grad_score_sum_E->const_data_ptr<acc_t>() : nullptr;
  const acc_t grad_z = grad_lse_sq_sum ? grad_lse_sq_sum->const_data_ptr<acc_t>()[0] : acc_t(0);
  scalar_t* grad_logits = grad_logits_TE.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, n_tokens, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> prob_E(n_experts), grad_p_E(n_experts), row_buffer(n_experts);
    std::vector<acc_t> sigmoid_softmax_E(grad_lse_sq_sum && score == Score::Sigmoid ? n_experts : 0);
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* row = logits + t * n_experts;
      // The z-loss term needs lse and softmax(l): the scores themselves for softmax.
      acc_t lse = 0;
      const acc_t* softmax_E = prob_E.data();
      token_scores(row, n_experts, score, prob_E.data(),
                   grad_lse_sq_sum && score == Score::Softmax ? &lse : nullptr,
                   row_buffer.data());
      if (grad_lse_sq_sum && score == Score::Sigmoid) {
        token_scores(row, n_experts, Score::Softmax, sigmoid_softmax_E.data(), &lse,
                     row_buffer.data());
        softmax_E = sigmoid_softmax_E.data();
      }
      std::fill(grad_p_E.begin(), grad_p_E.end(), acc_t(0));
      if (grad_w) {
        const int32_t* chosen = experts + t * top_k;
        const acc_t* g = grad_w + t * top_k;
        acc_t total = 0, g_dot_p = 0;
        for (int64_t k = 0; k < top_k; ++k) {
          total += prob_E[chosen[k]];
          g_dot_p += g[k] * prob_E[chosen[k]];
        }
        total += acc_t(1e-20);
        for (int64_t k = 0; k < top_k; ++k)
          grad_p_E[chosen[k]] += normalize ? acc_t(scale) / total * (g[k] - g_dot_p / total)
                                           : acc_t(scale) * g[k];
      }
      if (grad_sum) {
        acc_t row_total = 0, h_dot_p = 0;
        for (int64_t e = 0; e < n_experts; ++e) {
          row_total += prob_E[e];
          h_dot_p += grad_sum[e] * prob_E[e];
        }
        if (score == Score::Softmax) row_total = 1;
        for (int64_t e = 0; e < n_experts; ++e)
          grad_p_E[e] += (grad_sum[e] - h_dot_p / row_total) / row_total;
      }
      scalar_t* out = grad_logits + t * n_experts;
      acc_t gp_dot_p = 0;
      if (score == Score::Softmax)
        for (int64_t e = 0; e < n_experts; ++e) gp_dot_p += grad_p_E[e] * prob_E[e];
      for (int64_t e = 0; e < n_experts; ++e) {
        const acc_t p = prob_E[e];
        acc_t grad = score == Score::Softmax ? p * (grad_p_E[e] - gp_dot_p)
                                             : grad_p_E[e] * p * (acc_t(1) - p);
        if (grad_lse_sq_sum)
          grad += grad_z * acc_t(2) * lse * softmax_E[e];
        out[e] = static_cast<scalar_t>(grad);
      }
    }
  });
}

// A direct torch.ops call reaches the kernel without ops.route's checks, and the kernel
// indexes the scores by experts_TK's ids, the gradients by token, slot and expert.
void check_backward_inputs(const c10::optional<at::Tensor>& grad_weights_TK,
                           const c10::optional<at::Tensor>& grad_score_sum_E,
                           const c10::optional<at::Tensor>& grad_lse_sq_sum,
                           const at::Tensor& logits_TE, const at::Tensor& experts_TK) {
  TORCH_CHECK_VALUE(logits_TE.dim() == 2, "route_backward: logits_TE must be 2-D [T, E], got ",
                    logits_TE.sizes());
  const int64_t n_tokens = logits_TE.size(0), n_experts = logits_TE.size(1);
  TORCH_CHECK_VALUE(experts_TK.dim() == 2 && experts_TK.size(0) == n_tokens &&
                        experts_TK.scalar_type() == at::kInt,
                    "route_backward: experts_TK must be int32 [T=", n_tokens, ", K], got ",
                    experts_TK.scalar_type(), " ", experts_TK.sizes());
  TORCH_CHECK_VALUE(!grad_weights_TK.has_value() || grad_weights_TK->sizes() == experts_TK.sizes(),
                    "route_backward: grad_weights_TK must have experts_TK's shape ",
                    experts_TK.sizes(), ", got ",
                    grad_weights_TK.has_value() ? grad_weights_TK->sizes() : at::IntArrayRef());
  TORCH_CHECK_VALUE(!grad_score_sum_E.has_value() ||
                        (grad_score_sum_E->dim() == 1 && grad_score_sum_E->size(0) == n_experts),
                    "route_backward: grad_score_sum_E must be 1-D [E=", n_experts, "], got ",
                    grad_score_sum_E.has_value() ? grad_score_sum_E->sizes() : at::IntArrayRef());
  TORCH_CHECK_VALUE(!grad_lse_sq_sum.has_value() || grad_lse_sq_sum->numel() == 1,
                    "route_backward: grad_lse_sq_sum must have one element, got ",
                    grad_lse_sq_sum.has_value() ? grad_lse_sq_sum->sizes() : at::IntArrayRef());
  const at::Tensor ids = experts_TK.contiguous();
  const int32_t* id = ids.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < ids.numel(); ++i)
    TORCH_CHECK_VALUE(id[i] >= 0 && id[i] < n_experts, "route_backward: experts_TK values must "
                      "be in [0, ", n_experts, "), got ", id[i]);
}

at::Tensor route_backward_cpu(const c10::optional<at::Tensor>& grad_weights_TK,
                              const c10::optional<at::Tensor>& grad_score_sum_E,
                              const c10::optional<at::Tensor>& grad_lse_sq_sum,
                              const at::Tensor& logits_TE_in, const at::Tensor& experts_TK,
                              c10::string_view score_name, bool normalize, double scale) {
  const Score score = parse_score(score_name);
  check_backward_inputs(grad_weights_TK, grad_score_sum_E, grad_lse_sq_sum, logits_TE_in,
                        experts_TK);
  const at::Tensor logits_TE = logits_TE_in.contiguous();
  const auto acc_type = logits_TE.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto as_acc = [&](const c10::optional<at::Tensor>& grad) {
    return grad.has_value() ? grad->to(acc_type).contiguous() : at::Tensor();
  };
  const at::Tensor grad_w = as_acc(grad_weights_TK), grad_sum = as_acc(grad_score_sum_E),
                   grad_z = as_acc(grad_lse_sq_sum);
  at::Tensor grad_logits_TE = at::empty_like(logits_TE);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits_TE.scalar_type(),
                                  "route_backward", [&] {
    route_backward_kernel<scalar_t>(grad_w.defined() ? &grad_w : nullptr,
                                    grad_sum.defined() ? &grad_sum : nullptr,
                                    grad_z.defined() ? &grad_z : nullptr, logits_TE,
                                    experts_TK.contiguous(), score, normalize, scale,
                                    grad_logits_TE);
  });
  return grad_logits_TE;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("route", &route_cpu);
  m.impl("route_backward", &route_backward_cpu);
}

}  // namespace dsv3
