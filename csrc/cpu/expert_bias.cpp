// Biased expert projections (GPT-OSS's) on the CPU: each expert's bias added to its
// rows of a grouped GEMM's output, and the bias gradient, the sum of each expert's rows.
//
// Why kernels of their own: the composed torch path (a gathered [S, N] bias, then an
// add) wrote two fresh [S, N] tensors per call, and on the 2-core VM the page faults
// of fresh multi-megabyte tensors cost more than the add itself: it ran slower than the
// reference loop (benchmarks.cpu_kernels, RESULTS.md). Here the add is one pass into an
// output from the kernels' cache (alloc.h), and the row sums one pass over the
// gradient in the accumulation type (the GPU path takes them from the grouped GEMM's
// wgrad with a ones operand, which on the CPU costs a GEMM's passes for a sum).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "alloc.h"
#include "offsets.h"
#include "vec_math.h"

namespace dsv3 {
namespace {

constexpr int64_t kRowGrain = 64;
constexpr int64_t kColumnBlock = 256;  // floats per buffer, and columns per row-sum task

DSV3_MULTIVERSION void add_floats(const float* a, const float* b, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

// out = y + bias, rounded once to the dtype (as torch's add): float rows directly, 16-bit
// ones widened to float chunks (multiversioned loops, vec_math.h), double in double.
template <typename scalar_t>
void add_row(const scalar_t* y, const scalar_t* bias, scalar_t* out, int64_t width) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    for (int64_t n = 0; n < width; ++n) out[n] = y[n] + bias[n];
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    add_floats(y, bias, out, width);
  } else {
    float y_buf[kColumnBlock], bias_buf[kColumnBlock], sum_buf[kColumnBlock];
    for (int64_t first = 0; first < width; first += kColumnBlock) {
      const int64_t count = std::min(kColumnBlock, width - first);
      vec::to_float(y + first, y_buf, count);
      vec::to_float(bias + first, bias_buf, count);
      add_floats(y_buf, bias_buf, sum_buf, count);
      vec::from_float(sum_buf, out + first, count);
    }
  }
}

// sums[0:count] = the sum of `n_rows` rows (stride `width`) of `count` columns, in rows'
// order, accumulated in float (double for double).
template <typename scalar_t>
void sum_rows(const scalar_t* rows, int64_t n_rows, int64_t width, int64_t count,
              scalar_t* sums) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    std::fill(sums, sums + count, 0.0);
    for (int64_t r = 0; r < n_rows; ++r)
      for (int64_t n = 0; n < count; ++n) sums[n] += rows[r * width + n];
  } else {
    float acc[kColumnBlock], row_buf[kColumnBlock];
    std::fill(acc, acc + count, 0.0f);
    for (int64_t r = 0; r < n_rows; ++r)
      vec::axpy(1.0f, vec::as_float(rows + r * width, row_buf, count), acc, count);
    vec::from_float(acc, sums, count);
  }
}

void check_rows(const at::Tensor& y_SN, const char* op) {
  TORCH_CHECK_VALUE(y_SN.dim() == 2, op, ": y_SN must be 2-D, got ", y_SN.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(y_SN.scalar_type()), op,
                   ": y_SN must be floating point, got ", y_SN.scalar_type());
}

at::Tensor add_expert_bias_cpu(const at::Tensor& y_SN, const at::Tensor& bias_EN,
                               const at::Tensor& offsets_E) {
  const char* op = "add_expert_bias";
  check_rows(y_SN, op);
  TORCH_CHECK_VALUE(bias_EN.dim() == 2 && bias_EN.size(1) == y_SN.size(1), op,
                    ": bias_EN must have shape [E, N=", y_SN.size(1), "], got ", bias_EN.sizes());
  TORCH_CHECK_TYPE(bias_EN.scalar_type() == y_SN.scalar_type(), op,
                   ": bias_EN must have y_SN's dtype ", y_SN.scalar_type(), ", got ",
                   bias_EN.scalar_type());
  const int64_t n_rows = y_SN.size(0), width = y_SN.size(1), n_experts = bias_EN.size(0);
  const std::vector<int64_t> starts = read_offsets(offsets_E, n_experts, n_rows, op);
  const at::Tensor y = y_SN.contiguous(), bias = bias_EN.contiguous();
  at::Tensor out_SN = empty_output({n_rows, width}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "add_expert_bias",
                                  [&] {
    const scalar_t* y_data = y.const_data_ptr<scalar_t>();
    const scalar_t* bias_data = bias.const_data_ptr<scalar_t>();
    scalar_t* out_data = out_SN.data_ptr<scalar_t>();
    at::parallel_for(0, n_rows, kRowGrain, [&](int64_t begin, int64_t end) {
      // the first expert whose rows end past `begin` owns it
      int64_t e = std::upper_bound(starts.begin() + 1, starts.end(), begin) - starts.begin() - 1;
      for (int64_t r = begin; r < end; ++r) {
        while (e < n_experts && starts[e + 1] <= r) ++e;
        const scalar_t* y_row = y_data + r * width;
        scalar_t* out_row = out_data + r * width;
        if (e == n_experts) {  // a dropped copy's row: no expert, its value kept
          std::copy(y_row, y_row + width, out_row);
          continue;
        }
        add_row(y_row, bias_data + e * width, out_row, width);
      }
    });
  });
  return out_SN;
}

// sums_EN[e] = sum of grad_SN's rows of expert e, in the accumulation type (fp32, fp64
// for fp64), rows in order: deterministic. An expert without rows gets zeros.
at::Tensor expert_row_sums_cpu(const at::Tensor& grad_SN, const at::Tensor& offsets_E) {
  const char* op = "expert_row_sums";
  check_rows(grad_SN, op);
  const int64_t n_rows = grad_SN.size(0), width = grad_SN.size(1);
  const int64_t n_experts = offsets_E.dim() == 1 ? offsets_E.size(0) : 0;
  const std::vector<int64_t> starts = read_offsets(offsets_E, n_experts, n_rows, op);
  const at::Tensor grad = grad_SN.contiguous();
  at::Tensor sums_EN = at::empty({n_experts, width}, grad.options());
  const int64_t n_blocks = (width + kColumnBlock - 1) / kColumnBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "expert_row_sums",
                                  [&] {
    const scalar_t* grad_data = grad.const_data_ptr<scalar_t>();
    scalar_t* sums_data = sums_EN.data_ptr<scalar_t>();
    at::parallel_for(0, n_experts * n_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t e = task / n_blocks, first = (task % n_blocks) * kColumnBlock;
        sum_rows(grad_data + starts[e] * width + first, starts[e + 1] - starts[e], width,
                 std::min(kColumnBlock, width - first), sums_data + e * width + first);
      }
    });
  });
  return sums_EN;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("add_expert_bias", &add_expert_bias_cpu);
  m.impl("expert_row_sums", &expert_row_sums_cpu);
}

}  // namespace dsv3
