// GPT-OSS's gated activation on the CPU, fused: one pass reads the grouped GEMM's
// [S, 2F] output, whose gate and up columns are interleaved (gate at even columns, up
// at odd: how GPT-OSS's checkpoints lay out gate_up_proj), and writes
// gate * sigmoid(alpha * gate) * (up + 1). Unlike SwiGLU (swiglu.cpp), which reads two
// halves of a row, each chunk here reads one contiguous run of 2n values and splits
// gate and up inside the math loop (stride-2 loads, which GCC vectorizes with
// permutes); the backward writes its two gradients back interleaved the same way. The
// backward recomputes the sigmoid from the saved input, as SwiGLU's does. Math in float
// on row chunks (vec_math.h), fp64 in double.
//
// With a limit L (GPT-OSS's swiglu_limit, 7) the inputs are first clamped as torch's
// clamp on a tensor of their dtype does: with Lr = L rounded to that dtype,
// gate = min(gate, Lr), up = clamp(up, -Lr, Lr) (NaN stays NaN); each gradient is zero
// where its input lies outside the bounds, and on the bounds themselves unless
// grad_at_limit (torch 2.12 and before pass it there, 2.14 does not: dsv3/ops/swiglu.py
// asks the running torch once, for both ops).
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
constexpr int64_t kChunk = 512;  // outputs per chunk: its float buffers (<= 10 KiB) stay in L1

using clamp::Clamp;
using clamp::check_hidden;
using clamp::check_limit;
using clamp::clamp_up;
using clamp::float_clamp;
using vec::fast_sigmoid;

// gate_up holds n (gate, up) pairs; out[i] = g sigmoid(alpha g) (u + 1).
DSV3_MULTIVERSION void glu_chunk(const float* gate_up, float* out, int64_t n, float alpha) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate_up[2 * i], u = gate_up[2 * i + 1];
    out[i] = g * fast_sigmoid(alpha * g) * (u + 1.0f);
  }
}

// With s = sigmoid(alpha g) and t = dy (u + 1): d(up) = dy (g s);
// d(gate) = t s + t g (1 - s) s alpha, written interleaved as the input. Multiplied in
// torch autograd's order (mul, sigmoid and mul backwards), so overflows and infinities
// give torch's values: the factored t s (1 + alpha g (1 - s)) overflowed alpha g for a
// large finite alpha, and made inf * 0 = NaN where the sigmoid saturates and torch's
// gradient is finite.
DSV3_MULTIVERSION void glu_backward_chunk(const float* dy, const float* gate_up,
                                          float* grad_gate_up, int64_t n, float alpha) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate_up[2 * i], u = gate_up[2 * i + 1];
    const float s = fast_sigmoid(alpha * g);
    const float t = dy[i] * (u + 1.0f);
    grad_gate_up[2 * i] = t * s + t * g * (1.0f - s) * s * alpha;
    grad_gate_up[2 * i + 1] = dy[i] * (g * s);
  }
}

// The clamped variants are separate functions (not a flag in the loops above), so the
// unclamped ones carry no compare-and-select.
DSV3_MULTIVERSION void glu_clamped_chunk(const float* gate_up, float* out, int64_t n,
                                         float alpha, Clamp lim) {
  const float v = lim.value;
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate_up[2 * i] > v ? v : gate_up[2 * i];
    const float u_in = gate_up[2 * i + 1];
    const float u = u_in > v ? v : (u_in < -v ? -v : u_in);
    out[i] = g * fast_sigmoid(alpha * g) * (u + 1.0f);
  }
}

// The formulas above on the clamped g, u; each gradient zero where its input was
// clamped (beyond L for gate, beyond +-L for up) and, unless lim.at_limit, at +-L:
// an input passes if below ``pass_below``, L itself or (at_limit) the float just above
// it. One comparison each, so the loop vectorizes (short-circuit ||, && did not). A NaN
// input fails it: its own gradient is 0, as torch's clamp gives.
DSV3_MULTIVERSION void glu_clamped_backward_chunk(const float* dy, const float* gate_up,
                                                  float* grad_gate_up, int64_t n, float alpha,
                                                  Clamp lim) {
  const float v = lim.value;
  const float pass_below = lim.at_limit ? std::nextafter(v, INFINITY) : v;
  for (int64_t i = 0; i < n; ++i) {
    const float g_in = gate_up[2 * i], u_in = gate_up[2 * i + 1];
    const float g = g_in > v ? v : g_in;
    const float u = u_in > v ? v : (u_in < -v ? -v : u_in);
    const float s = fast_sigmoid(alpha * g);
    const float t = dy[i] * (u + 1.0f);
    const float grad_gate = t * s + t * g * (1.0f - s) * s * alpha;
    grad_gate_up[2 * i] = g_in < pass_below ? grad_gate : 0.0f;
    grad_gate_up[2 * i + 1] = std::fabs(u_in) < pass_below ? dy[i] * (g * s) : 0.0f;
  }
}

void check_numbers(double alpha, const std::optional<double>& limit, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(alpha), op, ": alpha must be finite, got ", alpha);
  check_limit(limit, op);
}

// float32 is read (and, where a chunk's output is float, written) in place; bf16/fp16
// are widened per chunk into the buffers and narrowed back.
template <typename scalar_t>
void glu_rows(const scalar_t* h, scalar_t* a, int64_t begin, int64_t end, int64_t ffn,
              float alpha, const std::optional<Clamp>& lim) {
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  float gate_up_buf[2 * kChunk], out_buf[kChunk];
  for (int64_t s = begin; s < end; ++s) {
    for (int64_t c = 0; c < ffn; c += kChunk) {
      const int64_t n = std::min(kChunk, ffn - c);
      const float* gate_up = vec::as_float(h + s * 2 * ffn + 2 * c, gate_up_buf, 2 * n);
      float* out = out_buf;
      if constexpr (kFloat) out = a + s * ffn + c;
      if (lim) {
        glu_clamped_chunk(gate_up, out, n, alpha, *lim);
      } else {
        glu_chunk(gate_up, out, n, alpha);
      }
      if constexpr (!kFloat) vec::from_float(out_buf, a + s * ffn + c, n);
    }
  }
}

template <typename scalar_t>
void glu_backward_rows(const scalar_t* grad, const scalar_t* h, scalar_t* grad_h, int64_t begin,
                       int64_t end, int64_t ffn, float alpha, const std::optional<Clamp>& lim) {
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  float dy_buf[kChunk], gate_up_buf[2 * kChunk], grad_buf[2 * kChunk];
  for (int64_t s = begin; s < end; ++s) {
    for (int64_t c = 0; c < ffn; c += kChunk) {
      const int64_t n = std::min(kChunk, ffn - c);
      const float* dy = vec::as_float(grad + s * ffn + c, dy_buf, n);
      const float* gate_up = vec::as_float(h + s * 2 * ffn + 2 * c, gate_up_buf, 2 * n);
      float* grad_gate_up = grad_buf;
      if constexpr (kFloat) grad_gate_up = grad_h + s * 2 * ffn + 2 * c;
      if (lim) {
        glu_clamped_backward_chunk(dy, gate_up, grad_gate_up, n, alpha, *lim);
      } else {
        glu_backward_chunk(dy, gate_up, grad_gate_up, n, alpha);
      }
      if constexpr (!kFloat) vec::from_float(grad_buf, grad_h + s * 2 * ffn + 2 * c, 2 * n);
    }
  }
}

// float64 is for gradcheck, where exactness matters more than speed. Without a limit
// nothing is clamped or masked, not even an infinite input's gradient.
bool passes(double x, double limit, bool at_limit) {  // x < limit, or on it
  return x < limit || (at_limit && x == limit);
}

void glu_rows(const double* h, double* a, int64_t begin, int64_t end, int64_t ffn, double alpha,
              const std::optional<double>& limit) {
  for (int64_t s = begin; s < end; ++s)
    for (int64_t f = 0; f < ffn; ++f) {
      const double g_in = h[s * 2 * ffn + 2 * f], u_in = h[s * 2 * ffn + 2 * f + 1];
      const double g = limit && g_in > *limit ? *limit : g_in;
      const double u = limit ? clamp_up(u_in, *limit) : u_in;
      a[s * ffn + f] = g / (1.0 + std::exp(-alpha * g)) * (u + 1.0);
    }
}

void glu_backward_rows(const double* grad, const double* h, double* grad_h, int64_t begin,
                       int64_t end, int64_t ffn, double alpha, const std::optional<double>& limit,
                       bool at_limit) {
  for (int64_t s = begin; s < end; ++s)
    for (int64_t f = 0; f < ffn; ++f) {
      const int64_t i = s * 2 * ffn + 2 * f;
      const double g_in = h[i], u_in = h[i + 1], dy = grad[s * ffn + f];
      const double g = limit && g_in > *limit ? *limit : g_in;
      const double u = limit ? clamp_up(u_in, *limit) : u_in;
      const double sig = 1.0 / (1.0 + std::exp(-alpha * g));
      const bool gate_in = !limit || passes(g_in, *limit, at_limit);  // no lower bound
      const bool up_in = !limit || passes(std::fabs(u_in), *limit, at_limit);
      const double t = dy * (u + 1.0);  // torch's order, as in glu_backward_chunk
      grad_h[i] = gate_in ? t * sig + t * g * (1.0 - sig) * sig * alpha : 0.0;
      grad_h[i + 1] = up_in ? dy * (g * sig) : 0.0;
    }
}

template <typename scalar_t>
void glu_dispatch(const scalar_t* h, scalar_t* a, int64_t begin, int64_t end, int64_t ffn,
                  double alpha, const std::optional<double>& limit) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    glu_rows(h, a, begin, end, ffn, alpha, limit);
  } else {
    glu_rows(h, a, begin, end, ffn, static_cast<float>(alpha), float_clamp<scalar_t>(limit, false));
  }
}

template <typename scalar_t>
void glu_backward_dispatch(const scalar_t* grad, const scalar_t* h, scalar_t* grad_h,
                           int64_t begin, int64_t end, int64_t ffn, double alpha,
                           const std::optional<double>& limit, bool at_limit) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    glu_backward_rows(grad, h, grad_h, begin, end, ffn, alpha, limit, at_limit);
  } else {
    glu_backward_rows(grad, h, grad_h, begin, end, ffn, static_cast<float>(alpha),
                      float_clamp<scalar_t>(limit, at_limit));
  }
}

at::Tensor gpt_oss_glu_cpu(const at::Tensor& h_S2F_in, double alpha, std::optional<double> limit) {
  check_hidden(h_S2F_in, "gpt_oss_glu");
  check_numbers(alpha, limit, "gpt_oss_glu");
  const at::Tensor h_S2F = h_S2F_in.contiguous();
  const int64_t n_rows = h_S2F.size(0), ffn = h_S2F.size(1) / 2;
  at::Tensor a_SF = empty_output({n_rows, ffn}, h_S2F.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_S2F.scalar_type(), "gpt_oss_glu",
                                  [&] {
    const scalar_t* h = h_S2F.const_data_ptr<scalar_t>();
    scalar_t* a = a_SF.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n_rows, kRowGrain, [&](int64_t begin, int64_t end) {
      glu_dispatch(h, a, begin, end, ffn, alpha, limit);
    });
  });
  return a_SF;
}

at::Tensor gpt_oss_glu_backward_cpu(const at::Tensor& grad_a_SF_in, const at::Tensor& h_S2F_in,
                                    double alpha, std::optional<double> limit,
                                    bool grad_at_limit) {
  check_hidden(h_S2F_in, "gpt_oss_glu_backward");
  check_numbers(alpha, limit, "gpt_oss_glu_backward");
  const at::Tensor h_S2F = h_S2F_in.contiguous();
  const int64_t n_rows = h_S2F.size(0), ffn = h_S2F.size(1) / 2;
  clamp::check_output_grad(grad_a_SF_in, h_S2F, "gpt_oss_glu_backward");
  const at::Tensor grad_a_SF = grad_a_SF_in.to(h_S2F.scalar_type()).contiguous();
  at::Tensor grad_h_S2F = empty_output(h_S2F.sizes(), h_S2F.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_S2F.scalar_type(),
                                  "gpt_oss_glu_backward", [&] {
    const scalar_t* grad = grad_a_SF.const_data_ptr<scalar_t>();
    const scalar_t* h = h_S2F.const_data_ptr<scalar_t>();
    scalar_t* grad_h = grad_h_S2F.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n_rows, kRowGrain, [&](int64_t begin, int64_t end) {
      glu_backward_dispatch(grad, h, grad_h, begin, end, ffn, alpha, limit, grad_at_limit);
    });
  });
  return grad_h_S2F;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("gpt_oss_glu", &gpt_oss_glu_cpu);
  m.impl("gpt_oss_glu_backward", &gpt_oss_glu_backward_cpu);
}

}  // namespace dsv3
