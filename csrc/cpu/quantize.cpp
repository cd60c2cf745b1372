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

namespace dsv3 {
namespace {

// ceil(n / block_size) without n + block_size - 1, which overflowed for a block_size
// near 2^63 (0 blocks, and the scales left unwritten).
int64_t blocks_of(int64_t n, int64_t block_size) { return n / block_size + (n % block_size != 0); }

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
  at::Tensor q_N = at::empty({n}, x.options().dtype(at::kChar));
  at::Tensor scales_B = at::empty({n_blocks}, x.options());
  at::Tensor new_error_N = at::empty({n}, x.options());
  const float* in = x.const_data_ptr<float>();
  const float* err = error.defined() ? error.const_data_ptr<float>() : nullptr;
  int8_t* q = q_N.mutable_data_ptr<int8_t>();
  float* scales = scales_B.mutable_data_ptr<float>();
  float* residual = new_error_N.mutable_data_ptr<float>();

  at::parallel_for(0, n_blocks, 16, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t b = block_begin; b < block_end; ++b) {
      const int64_t lo = b * block_size, hi = std::min(n, lo + block_size);
      float amax = 0.f;
      bool finite = true;  // std::max drops NaN, so NaN is tracked on its own
      for (int64_t i = lo; i < hi; ++i) {
        const float v = err ? in[i] + err[i] : in[i];
        residual[i] = v;  // v parked here until the scale is known
        amax = std::max(amax, std::fabs(v));
        finite &= std::isfinite(v);
      }
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
      for (int64_t i = lo; i < hi; ++i) {
        const float v = residual[i];
        // Half away from zero; clamped, since a denormal scale (max|v| below about
        // 1.5e-36) is rounded and v / scale can pass 127.5 (int8 would wrap).
        const float level =
            scale > 0.f ? std::min(127.f, std::max(-127.f, std::round(v / scale))) : 0.f;
        q[i] = static_cast<int8_t>(level);
        residual[i] = v - level * scale;
      }
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
  at::Tensor sum_N = at::empty({n}, scales_RB.options());
  const int8_t* q = q_RN.const_data_ptr<int8_t>();
  const float* scales = scales_RB.const_data_ptr<float>();
  float* out = sum_N.mutable_data_ptr<float>();
  at::parallel_for(0, n_blocks, 16, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t b = block_begin; b < block_end; ++b) {
      const int64_t lo = b * block_size, hi = std::min(n, lo + block_size);
      for (int64_t i = lo; i < hi; ++i) out[i] = 0.f;
      for (int64_t r = 0; r < n_rows; ++r) {  // rows in order: the same sum on every rank
        const float scale = scales[r * n_blocks + b];
        const int8_t* row = q + r * n;
        for (int64_t i = lo; i < hi; ++i) out[i] += static_cast<float>(row[i]) * scale;
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
