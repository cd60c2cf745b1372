// The router's per-token float rows (see route_rows.h): each pass a plain loop with an
// OpenMP simd reduction, compiled per ISA by DSV3_MULTIVERSION.
#include "route_rows.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "vec_math.h"

namespace dsv3::route_rows {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
// Below fast_exp's clamp, entries take std::exp.
constexpr float kFastExpLow = vec::kFastExpLowest;

// False when the row holds NaN or +inf.
DSV3_MULTIVERSION bool all_usable(const float* x, int64_t n) {
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) bad |= (x[i] != x[i]) | (x[i] == kInf);
  return !bad;
}

DSV3_MULTIVERSION float row_max(const float* x, int64_t n) {
  float best = -kInf;
#pragma omp simd reduction(max : best)
  for (int64_t i = 0; i < n; ++i) best = x[i] > best ? x[i] : best;
  return best;
}

DSV3_MULTIVERSION float row_min(const float* x, int64_t n) {
  float least = kInf;
#pragma omp simd reduction(min : least)
  for (int64_t i = 0; i < n; ++i) least = x[i] < least ? x[i] : least;
  return least;
}

// out_i = exp(x_i - shift), returning their sum. Whether fast_exp's clamp was reached
// is row_min's to tell, after.
DSV3_MULTIVERSION float shifted_exps(const float* x, float shift, int64_t n, float* out) {
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) {
    out[i] = vec::fast_exp(x[i] - shift);
    total += out[i];
  }
  return total;
}

DSV3_MULTIVERSION void divide(float* x, float by, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] /= by;
}

DSV3_MULTIVERSION void sigmoids(const float* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = vec::fast_sigmoid(x[i]);
}

// Takes the top_k of value (consumed: each pick becomes NaN, which neither the max nor
// the search sees, so an untaken -inf, e.g. a group's top-2 sum under a bias near -fp32's
// max, is still found after taken ones), best first, ties to the lower index: per pick a
// vectorized max, then a vectorized search for its first index, with no data-dependent
// branch (the insertion mispredicted through ~25 inserts a token at 64 experts, top-8).
// Needs no NaN and at least top_k values.
DSV3_MULTIVERSION void take_top_k(float* value, int32_t n, int64_t top_k, float* best_value_K,
                                  int32_t* best_index_K) {
  for (int64_t k = 0; k < top_k; ++k) {
    float best = -kInf;
#pragma omp simd reduction(max : best)
    for (int32_t i = 0; i < n; ++i) best = value[i] > best ? value[i] : best;
    int32_t first = n;
#pragma omp simd reduction(min : first)
    for (int32_t i = 0; i < n; ++i) {
      const int32_t candidate = value[i] == best ? i : n;
      first = candidate < first ? candidate : first;
    }
    best_value_K[k] = best;
    best_index_K[k] = first;
    value[first] = std::numeric_limits<float>::quiet_NaN();
  }
}

}  // namespace

void select_experts(const float* choice_E, int64_t n_experts, const Groups& groups,
                    int64_t top_k, float* scratch, int32_t* slots, int32_t* chosen_K) {
  if (std::isnan(choice_E[0])) {  // a softmax row of all -inf: every score NaN
    select_experts<float>(choice_E, n_experts, groups, top_k, scratch, slots, chosen_K);
    return;
  }
  const auto take = [](float* values, int64_t n, int64_t k, float* best_value_K,
                       int32_t* best_index_K) {
    take_top_k(values, static_cast<int32_t>(n), k, best_value_K, best_index_K);
  };
  select_experts_by(take, choice_E, n_experts, groups, top_k, scratch, slots, chosen_K);
}

bool softmax(const float* logits_E, int64_t n_experts, float* prob_E, float* lse) {
  const bool usable = all_usable(logits_E, n_experts);
  const float max_logit = row_max(logits_E, n_experts);
  if (max_logit == -kInf) {  // no expert can be scored: torch's softmax gives NaN
    for (int64_t e = 0; e < n_experts; ++e) prob_E[e] = std::numeric_limits<float>::quiet_NaN();
    *lse = -kInf;
    return usable;
  }
  float total = shifted_exps(logits_E, max_logit, n_experts, prob_E);
  if (row_min(logits_E, n_experts) - max_logit < kFastExpLow) {
    // Rare: the far-below entries redone exactly (0 for -inf), and the sum.
    total = 0.0f;
    for (int64_t e = 0; e < n_experts; ++e) {
      const float d = logits_E[e] - max_logit;
      if (d < kFastExpLow) prob_E[e] = std::exp(d);
      total += prob_E[e];
    }
  }
  divide(prob_E, total, n_experts);
  *lse = max_logit + std::log(total);
  return usable;
}

bool sigmoid(const float* logits_E, int64_t n_experts, float* prob_E) {
  const bool usable = all_usable(logits_E, n_experts);
  sigmoids(logits_E, n_experts, prob_E);
  if (row_min(logits_E, n_experts) < kFastExpLow)  // exp(-x) past fast_exp's top clamp
    for (int64_t e = 0; e < n_experts; ++e)
      if (logits_E[e] < kFastExpLow) prob_E[e] = 1.0f / (1.0f + std::exp(-logits_E[e]));
  return usable;
}

float logsumexp(const float* logits_E, int64_t n_experts) {
  const float max_logit = row_max(logits_E, n_experts);
  if (max_logit == -kInf) return max_logit;
  // The max's own term is 1, so what fast_exp's clamp adds below 1.6e-38 is lost in
  // rounding: no redo needed here. The exps are written to nowhere useful: a scratch row.
  float total = 0.0f;
  for (int64_t start = 0; start < n_experts; start += 256) {
    float scratch[256];
    const int64_t n = n_experts - start < 256 ? n_experts - start : 256;
    total += shifted_exps(logits_E + start, max_logit, n, scratch);
  }
  return max_logit + std::log(total);
}

}  // namespace dsv3::route_rows
