// Block-wise int8 quantization with error feedback, and the fused dequantize +
// reduce of several ranks' chunks, on the CPU: the compute side of dsv3's
// compressed gradient all-reduce. One pass over the values each way; blocks are
// independent, so OpenMP splits them with no effect on the result.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "alloc.h"
#include "vec_math.h"

namespace dsv3 {
namespace {

// ceil(n / block_size) without n + block_size - 1, which overflowed for a block_size
// near 2^63 (0 blocks, and the scales left unwritten).
int64_t blocks_of(int64_t n, int64_t block_size) { return n / block_size + (n % block_size != 0); }

// v = x (+ error) parked in residual until the block's scale is known; returns max |v|,
// and whether every v is finite (max drops NaN, so a probe v - v, NaN for inf and NaN,
// is summed beside it). The reductions are exact in any order: vectorized (omp simd,
// multiversioned: vec_math.h), the result is the scalar loop's.
DSV3_MULTIVERSION float park_values(const float* in, const float* err, float* residual,
                                    int64_t n, bool& finite) {
  if (err != nullptr) {
    for (int64_t i = 0; i < n; ++i) residual[i] = in[i] + err[i];
  } else {
    std::copy(in, in + n, residual);
  }
  float amax = 0.f, probe = 0.f;
#pragma omp simd reduction(max : amax) reduction(+ : probe)
  for (int64_t i = 0; i < n; ++i) {
    amax = std::max(amax, std::fabs(residual[i]));
    probe += residual[i] - residual[i];
  }
  finite = probe == 0.f;
  return amax;
}

// q = v / scale rounded half away from zero, and the residual what q * scale misses.
// Clamped, since a denormal scale (max|v| below about 1.5e-36) is rounded and v / scale
// can pass 127.5 (int8 would wrap). Built for the baseline ISA, as add_dequantized: there
// is no FMA there to fuse v - level * scale, whose rounding the reference's must match.
void quantize_block(float* residual, int8_t* q, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = residual[i];
    const float level =
        scale > 0.f ? std::min(127.f, std::max(-127.f, std::round(v / scale))) : 0.f;
    q[i] = static_cast<int8_t>(level);
    residual[i] = v - level * scale;
  }
}

void add_dequantized(const int8_t* q, float scale, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] += static_cast<float>(q[i]) * scale;
}

void check_block_size(int64_t block_size, const char* op) {
  TORCH_CHECK_VALUE(block_size >= 1, op, ": block_size must be >= 1, got ", block_size);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int8_cpu(
    const at::Tensor& x_N, int64_t block_size, const c10::optional<at::Tensor>& error_N) {
  check_block_size(block_size, "quantize_int8");
  TORCH_CHECK_VALUE(x_N.dim() == 1, "quantize_int8: x_N must be 1-D, got ", x_N.sizes());
  const at::Tensor x = x_N.to(at::kFloat).contiguous();
  const int64_t n = x.numel(), n_blocks = blocks_of(n, block_size);
  at::Tensor error;
  if (error_N.has_value()) {
    TORCH_CHECK_VALUE(error_N->sizes() == x_N.sizes(), "quantize_int8: error_N must have shape ",
                      x_N.sizes(), ", got ", error_N->sizes());
    error = error_N->to(at::kFloat).contiguous();
  }
  // the large outputs from the kernels' cache (alloc.h): a gradient bucket's size
  // comes back every step, already faulted in
  at::Tensor q_N = empty_output({n}, x.options().dtype(at::kChar));
  at::Tensor scales_B = at::empty({n_blocks}, x.options());
  at::Tensor new_error_N = empty_output({n}, x.options());
  const float* in = x.const_data_ptr<float>();
  const float* err = error.defined() ? error.const_data_ptr<float>() : nullptr;
  int8_t* q = q_N.mutable_data_ptr<int8_t>();
  float* scales = scales_B.mutable_data_ptr<float>();
  float* residual = new_error_N.mutable_data_ptr<float>();

  at::parallel_for(0, n_blocks, 16, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t b = block_begin; b < block_end; ++b) {
      const int64_t lo = b * block_size, hi = std::min(n, lo + block_size);
      bool finite = true;
      const float amax = park_values(in + lo, err ? err + lo : nullptr, residual + lo, hi - lo,
                                     finite);
      if (!finite) {
        // inf/NaN (an fp16 overflow): NaN out, so AMP's scaler skips the step, and a
        // clean residual, so the overflow does not leak into later steps.
        scales[b] = std::numeric_limits<float>::quiet_NaN();
        for (int64_t i = lo; i < hi; ++i) {
          q[i] = 0;
          residual[i] = 0.f;
        }
        continue;
      }
      const float scale = amax / 127.f;
      scales[b] = scale;
      quantize_block(residual + lo, q + lo, hi - lo, scale);
    }
  });
  return {q_N, scales_B, new_error_N};
}

at::Tensor dequantize_int8_cpu(const at::Tensor& q_RN_in, const at::Tensor& scales_RB_in,
                               int64_t block_size) {
  check_block_size(block_size, "dequantize_int8");
  TORCH_CHECK_TYPE(q_RN_in.scalar_type() == at::kChar, "dequantize_int8: q_RN must be int8");
  TORCH_CHECK_TYPE(scales_RB_in.scalar_type() == at::kFloat,
                   "dequantize_int8: scales_RB must be float32");
  // (contiguous after the unsqueeze too: a strided or expanded 1-D q_N was read as dense)
  const at::Tensor q_RN = (q_RN_in.dim() == 1 ? q_RN_in.unsqueeze(0) : q_RN_in).contiguous();
  const at::Tensor scales_RB =
      (scales_RB_in.dim() == 1 ? scales_RB_in.unsqueeze(0) : scales_RB_in).contiguous();
  TORCH_CHECK_VALUE(q_RN.dim() == 2, "dequantize_int8: q_RN must be 1-D or 2-D, got ",
                    q_RN_in.sizes());
  const int64_t n_rows = q_RN.size(0), n = q_RN.size(1);
  const int64_t n_blocks = blocks_of(n, block_size);
  TORCH_CHECK_VALUE(scales_RB.dim() == 2 && scales_RB.size(0) == n_rows &&
                        scales_RB.size(1) == n_blocks,
                    "dequantize_int8: scales_RB must have shape [", n_rows, ", ", n_blocks,
                    "] for q_RN ", q_RN_in.sizes(), " and block_size ", block_size, ", got ",
                    scales_RB_in.sizes());
  at::Tensor sum_N = empty_output({n}, scales_RB.options());
  const int8_t* q = q_RN.const_data_ptr<int8_t>();
  const float* scales = scales_RB.const_data_ptr<float>();
  float* out = sum_N.mutable_data_ptr<float>();
  at::parallel_for(0, n_blocks, 16, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t b = block_begin; b < block_end; ++b) {
      const int64_t lo = b * block_size, hi = std::min(n, lo + block_size);
      for (int64_t i = lo; i < hi; ++i) out[i] = 0.f;
      for (int64_t r = 0; r < n_rows; ++r) {  // rows in order: the same sum on every rank
        const float scale = scales[r * n_blocks + b];
        add_dequantized(q + r * n + lo, scale, out + lo, hi - lo);
      }
    }
  });
  return sum_N;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("quantize_int8", &quantize_int8_cpu);
  m.impl("dequantize_int8", &dequantize_int8_cpu);
}

}  // namespace dsv3
