// Fused top-k router on the CPU: one pass over each token's logits computes the
// scores, the (group-limited) selection, the weights and, in the same sweep, a
// NaN check, so no second pass over logits_TE is needed. OpenMP over tokens.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

namespace dsv3 {
namespace {

enum class Score { Softmax, Sigmoid };

Score parse_score(c10::string_view score) {
  if (score == "softmax") return Score::Softmax;
  if (score == "sigmoid") return Score::Sigmoid;
  TORCH_CHECK_VALUE(false, "route: score must be 'softmax' or 'sigmoid', got '", score, "'");
}

// Fills prob_E with softmax or sigmoid of one token's logits; returns false on NaN
// or +inf (which would turn the softmax into NaN); -inf is a legal "never" logit.
template <typename scalar_t, typename acc_t>
bool token_scores(const scalar_t* logits_E, int64_t n_experts, Score score, acc_t* prob_E) {
  bool finite = true;
  if (score == Score::Sigmoid) {
    for (int64_t e = 0; e < n_experts; ++e) {
      acc_t l = static_cast<acc_t>(logits_E[e]);
      finite &= !std::isnan(l) && l != std::numeric_limits<acc_t>::infinity();
      prob_E[e] = acc_t(1) / (acc_t(1) + std::exp(-l));
    }
    return finite;
  }
  acc_t max_logit = -std::numeric_limits<acc_t>::infinity();
  for (int64_t e = 0; e < n_experts; ++e) {
    acc_t l = static_cast<acc_t>(logits_E[e]);
    finite &= !std::isnan(l) && l != std::numeric_limits<acc_t>::infinity();
    max_logit = l > max_logit ? l : max_logit;
  }
  acc_t total = 0;
  for (int64_t e = 0; e < n_experts; ++e) {
    prob_E[e] = std::exp(static_cast<acc_t>(logits_E[e]) - max_logit);
    total += prob_E[e];
  }
  for (int64_t e = 0; e < n_experts; ++e) prob_E[e] /= total;
  return finite;
}

// Index of the largest value in [begin, end) not yet taken; ties go to the lowest
// index so routing is deterministic and matches a stable descending sort.
template <typename acc_t>
int64_t argmax_untaken(const acc_t* value, const std::vector<char>& taken, int64_t begin,
                       int64_t end) {
  int64_t best = -1;
  for (int64_t i = begin; i < end; ++i) {
    if (taken[i]) continue;
    if (best < 0 || value[i] > value[best]) best = i;
  }
  return best;
}

template <typename scalar_t>
void route_kernel(const at::Tensor& logits_TE, int64_t top_k, Score score,
                  const c10::optional<at::Tensor>& bias_E, int64_t n_groups, int64_t topk_groups,
                  bool normalize, double scale, at::Tensor& weights_TK, at::Tensor& experts_TK) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_tokens = logits_TE.size(0), n_experts = logits_TE.size(1);
  const int64_t group_size = n_experts / n_groups;
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
  std::atomic<int64_t> nan_token{-1};

  at::parallel_for(0, n_tokens, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> prob_E(n_experts), choice_E(n_experts), group_score_G(n_groups);
    std::vector<char> taken_E(n_experts), taken_G(n_groups);
    for (int64_t t = begin; t < end; ++t) {
      if (!token_scores(logits + t * n_experts, n_experts, score, prob_E.data())) {
        nan_token.store(t);
        continue;
      }
      for (int64_t e = 0; e < n_experts; ++e) {
        choice_E[e] = prob_E[e] + (bias ? bias[e] : acc_t(0));
        taken_E[e] = 0;
      }
      if (n_groups > 1) {
        // A group's score is the sum of its two best choice scores (DeepSeek-V3);
        // experts outside the best topk_groups groups are marked taken (excluded).
        for (int64_t g = 0; g < n_groups; ++g) {
          const int64_t lo = g * group_size, hi = lo + group_size;
          int64_t first = argmax_untaken(choice_E.data(), taken_E, lo, hi);
          acc_t group_score = choice_E[first];
          if (group_size > 1) {
            taken_E[first] = 1;
            group_score += choice_E[argmax_untaken(choice_E.data(), taken_E, lo, hi)];
            taken_E[first] = 0;
          }
          group_score_G[g] = group_score;
          taken_G[g] = 0;
        }
        for (int64_t i = 0; i < topk_groups; ++i)
          taken_G[argmax_untaken(group_score_G.data(), taken_G, 0, n_groups)] = 1;
        for (int64_t e = 0; e < n_experts; ++e) taken_E[e] = !taken_G[e / group_size];
      }
      acc_t total = 0;
      for (int64_t k = 0; k < top_k; ++k) {
        const int64_t e = argmax_untaken(choice_E.data(), taken_E, 0, n_experts);
        taken_E[e] = 1;
        experts[t * top_k + k] = static_cast<int32_t>(e);
        weights[t * top_k + k] = prob_E[e];
        total += prob_E[e];
      }
      // The 1e-20 keeps an all-zero sigmoid row finite (as DeepSeek-V3 does).
      const acc_t factor = normalize ? acc_t(scale) / (total + acc_t(1e-20)) : acc_t(scale);
      for (int64_t k = 0; k < top_k; ++k) weights[t * top_k + k] *= factor;
    }
  });
  const int64_t bad = nan_token.load();
  TORCH_CHECK_VALUE(bad < 0, "route: logits_TE contains NaN or +inf (token ", bad, ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_cpu(
    const at::Tensor& logits_TE_in, int64_t top_k, c10::string_view score_name,
    const c10::optional<at::Tensor>& bias_E, int64_t n_groups, int64_t topk_groups, bool normalize,
    double scale) {
  const Score score = parse_score(score_name);
  TORCH_CHECK_VALUE(logits_TE_in.dim() == 2, "route: logits_TE must be 2-D [T, E]");
  const at::Tensor logits_TE = logits_TE_in.contiguous();
  const int64_t n_tokens = logits_TE.size(0), n_experts = logits_TE.size(1);
  TORCH_CHECK_VALUE(n_groups >= 1 && n_experts % n_groups == 0,
                    "route: n_groups must divide n_experts");
  TORCH_CHECK_VALUE(topk_groups >= 1 && topk_groups <= n_groups,
                    "route: topk_groups must be in [1, n_groups]");
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= topk_groups * (n_experts / n_groups),
                    "route: top_k must be in [1, experts in the selected groups]");
  const auto acc_type = logits_TE.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor weights_TK = at::empty({n_tokens, top_k}, logits_TE.options().dtype(acc_type));
  at::Tensor experts_TK = at::empty({n_tokens, top_k}, logits_TE.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits_TE.scalar_type(), "route", [&] {
    route_kernel<scalar_t>(logits_TE, top_k, score, bias_E, n_groups, topk_groups, normalize,
                           scale, weights_TK, experts_TK);
  });
  at::Tensor counts_E = at::zeros({n_experts}, experts_TK.options());
  int32_t* counts = counts_E.mutable_data_ptr<int32_t>();
  const int32_t* experts = experts_TK.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < n_tokens * top_k; ++i) ++counts[experts[i]];
  return {weights_TK, experts_TK, counts_E};
}

// d(weights) -> d(logits). With p the scores, s the sum of the selected ones and
// g = dL/dw: normalized weights w_k = scale * p_k / s give
//   dL/dp_k = scale / s * (g_k - sum_j g_j p_j / s), else dL/dp_k = scale * g_k;
// softmax: dL/dl_e = p_e * (dL/dp_e - sum_k dL/dp_k p_k); sigmoid: dL/dl_e = dL/dp_e p_e (1 - p_e).
template <typename scalar_t>
void route_backward_kernel(const at::Tensor& grad_weights_TK, const at::Tensor& logits_TE,
                           const at::Tensor& experts_TK, Score score, bool normalize, double scale,
                           at::Tensor& grad_logits_TE) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_tokens = logits_TE.size(0), n_experts = logits_TE.size(1);
  const int64_t top_k = experts_TK.size(1);
  const scalar_t* logits = logits_TE.const_data_ptr<scalar_t>();
  const int32_t* experts = experts_TK.const_data_ptr<int32_t>();
  const acc_t* grad_w = grad_weights_TK.const_data_ptr<acc_t>();
  scalar_t* grad_logits = grad_logits_TE.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, n_tokens, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> prob_E(n_experts), grad_E(n_experts), grad_p_K(top_k);
    for (int64_t t = begin; t < end; ++t) {
      token_scores(logits + t * n_experts, n_experts, score, prob_E.data());
      const int32_t* chosen = experts + t * top_k;
      const acc_t* g = grad_w + t * top_k;
      acc_t total = 0, g_dot_p = 0;
      for (int64_t k = 0; k < top_k; ++k) {
        total += prob_E[chosen[k]];
        g_dot_p += g[k] * prob_E[chosen[k]];
      }
      total += acc_t(1e-20);
      for (int64_t k = 0; k < top_k; ++k)
        grad_p_K[k] = normalize ? acc_t(scale) / total * (g[k] - g_dot_p / total)
                                : acc_t(scale) * g[k];
      scalar_t* out = grad_logits + t * n_experts;
      if (score == Score::Sigmoid) {
        for (int64_t e = 0; e < n_experts; ++e) out[e] = scalar_t(0);
        for (int64_t k = 0; k < top_k; ++k) {
          const acc_t p = prob_E[chosen[k]];
          out[chosen[k]] = static_cast<scalar_t>(grad_p_K[k] * p * (acc_t(1) - p));
        }
        continue;
      }
      acc_t gp_dot_p = 0;
      for (int64_t k = 0; k < top_k; ++k) gp_dot_p += grad_p_K[k] * prob_E[chosen[k]];
      for (int64_t e = 0; e < n_experts; ++e) grad_E[e] = -prob_E[e] * gp_dot_p;
      for (int64_t k = 0; k < top_k; ++k) grad_E[chosen[k]] += prob_E[chosen[k]] * grad_p_K[k];
      for (int64_t e = 0; e < n_experts; ++e) out[e] = static_cast<scalar_t>(grad_E[e]);
    }
  });
}

at::Tensor route_backward_cpu(const at::Tensor& grad_weights_TK, const at::Tensor& logits_TE_in,
                              const at::Tensor& experts_TK, c10::string_view score_name,
                              bool normalize, double scale) {
  const Score score = parse_score(score_name);
  const at::Tensor logits_TE = logits_TE_in.contiguous();
  const auto acc_type = logits_TE.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor grad_w = grad_weights_TK.to(acc_type).contiguous();
  at::Tensor grad_logits_TE = at::empty_like(logits_TE);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits_TE.scalar_type(),
                                  "route_backward", [&] {
    route_backward_kernel<scalar_t>(grad_w, logits_TE, experts_TK.contiguous(), score, normalize,
                                    scale, grad_logits_TE);
  });
  return grad_logits_TE;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("route", &route_cpu);
  m.impl("route_backward", &route_backward_cpu);
}

}  // namespace dsv3
