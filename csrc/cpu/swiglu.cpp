// SwiGLU on the CPU, fused: one pass reads gate and up from the grouped GEMM's
// [S, 2F] output and writes silu(gate) * up. The backward recomputes the sigmoid
// instead of saving silu(gate), so the layer keeps one [S, 2F] activation for
// backward rather than an extra [S, F]. Math in float on row chunks (vec_math.h).
//
// With a limit L (GLM-5-Next's and DeepSeek-V4's clamped SwiGLU) the inputs are first
// clamped as torch's clamp on a tensor of their dtype does: with Lr = L rounded to that
// dtype, gate = min(gate, Lr), up = clamp(up, -Lr, Lr) (NaN stays NaN); each gradient is
// zero where its input lies outside the bounds. On the bounds themselves torch changed
// its mind (the gradient passes in torch 2.12 and before; 2.14 takes the minimum-norm
// subgradient, 0): the caller says which (grad_at_limit; dsv3/ops/swiglu.py asks the
// running torch).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>

#include "alloc.h"
#include "clamp.h"
#include "vec_math.h"

namespace dsv3 {
namespace {

constexpr int64_t kRowGrain = 16;
constexpr int64_t kChunk = 512;  // floats per buffer: all buffers stay in L1

using clamp::Clamp;
using clamp::check_hidden;
using clamp::check_limit;
using clamp::clamp_up;
using clamp::float_clamp;
using vec::fast_sigmoid;

// silu(g) = g * sigmoid(g) is formed first, as torch does: g * up could overflow to inf
// where sigmoid(g) is 0 (a gate near -1e38), and inf * 0 is NaN where torch gives -0.
DSV3_MULTIVERSION void swiglu_chunk(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] * fast_sigmoid(gate[i]) * up[i];
}

// With sig = sigmoid(g): d(up) = dy * g * sig; d(gate) = dy * up * sig * (1 + g * (1 - sig)).
DSV3_MULTIVERSION void swiglu_backward_chunk(const float* dy, const float* gate, const float* up,
                                             float* grad_gate, float* grad_up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float sig = fast_sigmoid(gate[i]);
    grad_up[i] = dy[i] * (gate[i] * sig);
    grad_gate[i] = dy[i] * up[i] * sig * (1.0f + gate[i] * (1.0f - sig));
  }
}

// The clamped variants are separate functions (not a flag in the loops above), so the
// unclamped ones stay exactly as they were.
DSV3_MULTIVERSION void swiglu_clamped_chunk(const float* gate, const float* up, float* out,
                                            int64_t n, Clamp lim) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i] > lim.value ? lim.value : gate[i];
    const float u = up[i] > lim.value ? lim.value : (up[i] < -lim.value ? -lim.value : up[i]);
    out[i] = g * fast_sigmoid(g) * u;
  }
}

// The formulas above on the clamped g, u; each gradient zero where its input was
// clamped (beyond L for gate, beyond +-L for up) and, unless lim.at_limit, at +-L: an
// input passes if below ``pass_below``, L itself or (at_limit) the float just above it.
// One comparison each, so the loop vectorizes: with short-circuit ||, && GCC left it
// scalar, 4x slower than the unclamped loop. A NaN input fails it (gradient 0, as
// torch's clamp gives).
DSV3_MULTIVERSION void swiglu_clamped_backward_chunk(const float* dy, const float* gate,
                                                     const float* up, float* grad_gate,
                                                     float* grad_up, int64_t n, Clamp lim) {
  const float v = lim.value;
  const float pass_below = lim.at_limit ? std::nextafter(v, INFINITY) : v;
  for (int64_t i = 0; i < n; ++i) {
    const bool gate_in = gate[i] < pass_below;
    const bool up_in = std::fabs(up[i]) < pass_below;
    const float g = gate[i] > v ? v : gate[i];
    const float u = up[i] > v ? v : (up[i] < -v ? -v : up[i]);
    const float sig = fast_sigmoid(g);
    grad_up[i] = up_in ? dy[i] * (g * sig) : 0.0f;
    grad_gate[i] = gate_in ? dy[i] * u * sig * (1.0f + g * (1.0f - sig)) : 0.0f;
  }
}

// float32 runs on the tensors' memory directly; bf16/fp16 are widened per chunk.
template <typename scalar_t>
void swiglu_rows(const scalar_t* h, scalar_t* a, int64_t begin, int64_t end, int64_t ffn,
                 const std::optional<Clamp>& lim) {
  float gate[kChunk], up[kChunk], out[kChunk];
  for (int64_t s = begin; s < end; ++s) {
    for (int64_t c = 0; c < ffn; c += kChunk) {
      const int64_t n = std::min(kChunk, ffn - c);
      const scalar_t* gate_in = h + s * 2 * ffn + c;
      if (lim) {
        vec::to_float(gate_in, gate, n);
        vec::to_float(gate_in + ffn, up, n);
        swiglu_clamped_chunk(gate, up, out, n, *lim);
        vec::from_float(out, a + s * ffn + c, n);
      } else if constexpr (std::is_same_v<scalar_t, float>) {
        swiglu_chunk(gate_in, gate_in + ffn, a + s * ffn + c, n);
      } else {
        vec::to_float(gate_in, gate, n);
        vec::to_float(gate_in + ffn, up, n);
        swiglu_chunk(gate, up, out, n);
        vec::from_float(out, a + s * ffn + c, n);
      }
    }
  }
}

template <typename scalar_t>
void swiglu_backward_rows(const scalar_t* grad, const scalar_t* h, scalar_t* grad_h, int64_t begin,
                          int64_t end, int64_t ffn, const std::optional<Clamp>& lim) {
  float dy[kChunk], gate[kChunk], up[kChunk], grad_gate[kChunk], grad_up[kChunk];
  for (int64_t s = begin; s < end; ++s) {
    for (int64_t c = 0; c < ffn; c += kChunk) {
      const int64_t n = std::min(kChunk, ffn - c);
      const scalar_t* gate_in = h + s * 2 * ffn + c;
      scalar_t* grad_gate_out = grad_h + s * 2 * ffn + c;
      if (lim) {
        vec::to_float(grad + s * ffn + c, dy, n);
        vec::to_float(gate_in, gate, n);
        vec::to_float(gate_in + ffn, up, n);
        swiglu_clamped_backward_chunk(dy, gate, up, grad_gate, grad_up, n, *lim);
        vec::from_float(grad_gate, grad_gate_out, n);
        vec::from_float(grad_up, grad_gate_out + ffn, n);
      } else if constexpr (std::is_same_v<scalar_t, float>) {
        swiglu_backward_chunk(grad + s * ffn + c, gate_in, gate_in + ffn, grad_gate_out,
                              grad_gate_out + ffn, n);
      } else {
        vec::to_float(grad + s * ffn + c, dy, n);
        vec::to_float(gate_in, gate, n);
        vec::to_float(gate_in + ffn, up, n);
        swiglu_backward_chunk(dy, gate, up, grad_gate, grad_up, n);
        vec::from_float(grad_gate, grad_gate_out, n);
        vec::from_float(grad_up, grad_gate_out + ffn, n);
      }
    }
  }
}

// float64 is for gradcheck, where exactness matters more than speed. The limit is a
// double already; an infinite one (no limit: check_limit refuses a given one) clamps
// nothing and masks no gradient, not even of an infinite input.
double clamp_gate(double g, double limit) { return g > limit ? limit : g; }
bool passes(double x, double limit, bool at_limit) {  // within (-limit, limit), or on it
  return std::fabs(x) < limit || (at_limit && std::fabs(x) == limit);
}

void swiglu_rows(const double* h, double* a, int64_t begin, int64_t end, int64_t ffn,
                 double limit) {
  for (int64_t s = begin; s < end; ++s)
    for (int64_t f = 0; f < ffn; ++f) {
      const double g = clamp_gate(h[s * 2 * ffn + f], limit);
      const double u = clamp_up(h[s * 2 * ffn + ffn + f], limit);
      a[s * ffn + f] = g / (1.0 + std::exp(-g)) * u;  // silu(g) first, as torch
    }
}

void swiglu_backward_rows(const double* grad, const double* h, double* grad_h, int64_t begin,
                          int64_t end, int64_t ffn, double limit, bool at_limit) {
  for (int64_t s = begin; s < end; ++s)
    for (int64_t f = 0; f < ffn; ++f) {
      const double g_in = h[s * 2 * ffn + f], u_in = h[s * 2 * ffn + ffn + f];
      const double g = clamp_gate(g_in, limit), u = clamp_up(u_in, limit), dy = grad[s * ffn + f];
      const double sig = 1.0 / (1.0 + std::exp(-g));
      const bool unclamped = std::isinf(limit);
      const bool gate_in = unclamped || g_in < limit || (at_limit && g_in == limit);  // no lower bound
      const bool up_in = unclamped || passes(u_in, limit, at_limit);
      grad_h[s * 2 * ffn + f] = gate_in ? dy * u * sig * (1.0 + g * (1.0 - sig)) : 0.0;
      grad_h[s * 2 * ffn + ffn + f] = up_in ? dy * (g * sig) : 0.0;
    }
}

template <typename scalar_t>
void swiglu_dispatch(const scalar_t* h, scalar_t* a, int64_t begin, int64_t end, int64_t ffn,
                     const std::optional<double>& limit) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    swiglu_rows(h, a, begin, end, ffn, limit.value_or(INFINITY));
  } else {
    swiglu_rows(h, a, begin, end, ffn, float_clamp<scalar_t>(limit, false));
  }
}

template <typename scalar_t>
void swiglu_backward_dispatch(const scalar_t* grad, const scalar_t* h, scalar_t* grad_h,
                              int64_t begin, int64_t end, int64_t ffn,
                              const std::optional<double>& limit, bool at_limit) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    swiglu_backward_rows(grad, h, grad_h, begin, end, ffn, limit.value_or(INFINITY), at_limit);
  } else {
    swiglu_backward_rows(grad, h, grad_h, begin, end, ffn, float_clamp<scalar_t>(limit, at_limit));
  }
}

at::Tensor swiglu_cpu(const at::Tensor& h_S2F_in, std::optional<double> limit) {
  check_hidden(h_S2F_in, "swiglu");
  check_limit(limit, "swiglu");
  const at::Tensor h_S2F = h_S2F_in.contiguous();
  const int64_t n_rows = h_S2F.size(0), ffn = h_S2F.size(1) / 2;
  at::Tensor a_SF = empty_output({n_rows, ffn}, h_S2F.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_S2F.scalar_type(), "swiglu", [&] {
    const scalar_t* h = h_S2F.const_data_ptr<scalar_t>();
    scalar_t* a = a_SF.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n_rows, kRowGrain, [&](int64_t begin, int64_t end) {
      swiglu_dispatch(h, a, begin, end, ffn, limit);
    });
  });
  return a_SF;
}

at::Tensor swiglu_backward_cpu(const at::Tensor& grad_a_SF_in, const at::Tensor& h_S2F_in,
                               std::optional<double> limit, bool grad_at_limit) {
  check_hidden(h_S2F_in, "swiglu_backward");
  check_limit(limit, "swiglu_backward");
  const at::Tensor h_S2F = h_S2F_in.contiguous();
  const int64_t n_rows = h_S2F.size(0), ffn = h_S2F.size(1) / 2;
  clamp::check_output_grad(grad_a_SF_in, h_S2F, "swiglu_backward");
  const at::Tensor grad_a_SF = grad_a_SF_in.to(h_S2F.scalar_type()).contiguous();
  at::Tensor grad_h_S2F = empty_output(h_S2F.sizes(), h_S2F.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_S2F.scalar_type(),
                                  "swiglu_backward", [&] {
    const scalar_t* grad = grad_a_SF.const_data_ptr<scalar_t>();
    const scalar_t* h = h_S2F.const_data_ptr<scalar_t>();
    scalar_t* grad_h = grad_h_S2F.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n_rows, kRowGrain, [&](int64_t begin, int64_t end) {
      swiglu_backward_dispatch(grad, h, grad_h, begin, end, ffn, limit, grad_at_limit);
    });
  });
  return grad_h_S2F;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
}

}  // namespace dsv3
