// One token's router math in float, as loops that vectorize (multiversioned in
// route_rows.cpp), and its (group-limited) top-k selection.
//
// Why: the router spent its time in a scalar std::exp per logit and in top_k passes of
// an argmax over all experts. The exps now go through vec::fast_exp, whose clamp would
// tie far-below experts (an exp under 1.6e-38), so those few entries are redone with
// std::exp, as before; the float selection is top_k vectorized max-and-find passes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

namespace dsv3::route_rows {

// prob_E = softmax(logits_E), *lse = log(sum exp(logits_E)). False on NaN or +inf
// (the caller's error); an all -inf row gives NaN probabilities (torch's softmax) and
// lse -inf.
bool softmax(const float* logits_E, int64_t n_experts, float* prob_E, float* lse);

// prob_E = sigmoid(logits_E). False on NaN or +inf.
bool sigmoid(const float* logits_E, int64_t n_experts, float* prob_E);

// log(sum exp(logits_E)), -inf for an all -inf row.
float logsumexp(const float* logits_E, int64_t n_experts);

// How experts are grouped for group-limited selection (n_groups 1: no groups).
struct Groups {
  int64_t n_groups;
  int64_t topk_groups;
  bool top2_sum;  // a group scored by its two best choice scores, else by its best
};

// Scratch each select_experts call needs: values (the kept experts' choice scores, the
// group scores, the best group scores, the best top_k values), and int32 slots.
inline int64_t scratch_values(int64_t n_experts, const Groups& groups) {
  return 2 * n_experts + 2 * groups.n_groups;
}
inline int64_t scratch_slots(const Groups& groups) { return groups.n_groups; }

// The top_k best of value_E, best first, ties to the lower index (a stable descending
// sort's first top_k), by insertion. All-NaN values give the first top_k indices, as
// the stable sort does; -inf values come last.
template <typename acc_t>
void top_k_by_insertion(const acc_t* value_E, int64_t n, int64_t top_k, acc_t* best_value_K,
                        int32_t* best_index_K) {
  int64_t filled = 0;
  for (int64_t e = 0; e < n; ++e) {
    const acc_t value = value_E[e];
    int64_t slot;
    if (filled < top_k) {
      slot = filled++;
    } else {
      if (!(value > best_value_K[top_k - 1])) continue;
      slot = top_k - 1;
    }
    // Strictly greater moves up: an equal earlier index stays ahead.
    for (; slot > 0 && value > best_value_K[slot - 1]; --slot) {
      best_value_K[slot] = best_value_K[slot - 1];
      best_index_K[slot] = best_index_K[slot - 1];
    }
    best_value_K[slot] = value;
    best_index_K[slot] = static_cast<int32_t>(e);
  }
}

// A token's experts, best first: the top_k of choice_E among the experts of the
// topk_groups best groups (DeepSeek-V2 zeroes the others' scores instead, which picks
// the same experts while the kept scores are > 0 and nothing ties: its topk orders ties
// as it likes, ours goes to the lower index). Ties go to the lower index, groups as
// experts. top_k_of(values, n, k, best_value_K, best_index_K) is the selection; it may
// consume values (each is a scratch copy).
template <typename acc_t, typename TopK>
void select_experts_by(const TopK& top_k_of, const acc_t* choice_E, int64_t n_experts,
                       const Groups& groups, int64_t top_k, acc_t* scratch, int32_t* slots,
                       int32_t* chosen_K) {
  acc_t* kept_E = scratch;
  acc_t* group_score_G = kept_E + n_experts;
  acc_t* best_group_score_G = group_score_G + groups.n_groups;
  acc_t* best_value_K = best_group_score_G + groups.n_groups;  // top_k <= n_experts
  if (groups.n_groups > 1) {
    const int64_t group_size = n_experts / groups.n_groups;
    const int64_t n_best = groups.top2_sum ? std::min<int64_t>(2, group_size) : 1;
    for (int64_t g = 0; g < groups.n_groups; ++g) {
      acc_t best_value[2];
      int32_t best_index[2];
      std::copy_n(choice_E + g * group_size, group_size, kept_E);
      top_k_of(kept_E, group_size, n_best, best_value, best_index);
      group_score_G[g] = n_best == 2 ? best_value[0] + best_value[1] : best_value[0];
    }
    top_k_of(group_score_G, groups.n_groups, groups.topk_groups, best_group_score_G, slots);
    std::fill_n(kept_E, n_experts, -std::numeric_limits<acc_t>::infinity());
    for (int64_t i = 0; i < groups.topk_groups; ++i)
      std::copy_n(choice_E + slots[i] * group_size, group_size, kept_E + slots[i] * group_size);
  } else {
    std::copy_n(choice_E, n_experts, kept_E);
  }
  top_k_of(kept_E, n_experts, top_k, best_value_K, chosen_K);
}

// The generic selection, by insertion (fp64, and float rows of NaN scores); float has a
// vectorized overload.
template <typename acc_t>
void select_experts(const acc_t* choice_E, int64_t n_experts, const Groups& groups,
                    int64_t top_k, acc_t* scratch, int32_t* slots, int32_t* chosen_K) {
  select_experts_by(&top_k_by_insertion<acc_t>, choice_E, n_experts, groups, top_k, scratch,
                    slots, chosen_K);
}

void select_experts(const float* choice_E, int64_t n_experts, const Groups& groups,
                    int64_t top_k, float* scratch, int32_t* slots, int32_t* chosen_K);

}  // namespace dsv3::route_rows
