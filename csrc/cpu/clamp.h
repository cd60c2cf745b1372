// What the two gated activations' CPU kernels (swiglu.cpp, gpt_oss_glu.cpp) share:
// their input checks and the clamp that GLM-5-Next's, DeepSeek-V4's and GPT-OSS's
// swiglu_limit applies, with torch's clamp semantics on a tensor of the input's dtype.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

namespace dsv3::clamp {

// The limit as the float kernels use it: ``value``, L rounded to the tensor's dtype
// (exact in float); ``at_limit``, whether an input equal to +-value gets a gradient.
struct Clamp {
  float value;
  bool at_limit;
};

// The float kernels' clamp for a tensor of dtype ``scalar_t``.
template <typename scalar_t>
std::optional<Clamp> float_clamp(const std::optional<double>& limit, bool at_limit) {
  if (!limit) return std::nullopt;
  return Clamp{static_cast<float>(static_cast<scalar_t>(*limit)), at_limit};
}

// up.clamp(-limit, limit) in double (the float64 kernels, for gradcheck).
inline double clamp_up(double u, double limit) {
  return u > limit ? limit : (u < -limit ? -limit : u);
}

inline void check_hidden(const at::Tensor& h_S2F, const char* op) {
  TORCH_CHECK_VALUE(h_S2F.dim() == 2 && h_S2F.size(1) % 2 == 0, op,
                    ": h_S2F must be 2-D [S, 2F] with an even last dim, got ", h_S2F.sizes());
}

// grad_a_SF, the gradient of the activation of h_S2F [S, 2F], is [S, F]: the kernels
// read it row by row beside h.
inline void check_output_grad(const at::Tensor& grad_a_SF, const at::Tensor& h_S2F,
                              const char* op) {
  const int64_t n_rows = h_S2F.size(0), ffn = h_S2F.size(1) / 2;
  TORCH_CHECK_VALUE(grad_a_SF.dim() == 2 && grad_a_SF.size(0) == n_rows && grad_a_SF.size(1) == ffn,
                    op, ": grad_a_SF must be [S, F] = [", n_rows, ", ", ffn,
                    "] for h_S2F of shape ", h_S2F.sizes(), ", got ", grad_a_SF.sizes());
}

inline void check_limit(const std::optional<double>& limit, const char* op) {
  TORCH_CHECK_VALUE(!limit || (*limit > 0 && std::isfinite(*limit)), op,
                    ": limit must be a finite number > 0 (or None), got ", *limit);
}

}  // namespace dsv3::clamp
