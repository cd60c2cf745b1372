// See small_rows.h. Two loop orders, by which of w's dims is contiguous:
// - columns contiguous (w_XY a transposed view of an [out, in] weight, as nn.Linear
//   and dsv3.MoE store it): each output is a dot product of a row of x with a column
//   of w, and each column is read once for all the rows;
// - rows contiguous: each output row is a sum of w's rows scaled by x's values, each
//   row of w read once for all the rows.
#include "small_rows.h"

#include <algorithm>
#include <array>
#include <vector>

#include "vec_math.h"

namespace dsv3 {
namespace {

// out[r] = <x[r], w> for up to kSmallRowsMax rows, w read once.
DSV3_MULTIVERSION void dots(const float* const* x, int64_t n_rows, const float* w, int64_t n,
                            float* out) {
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  // Rows past n_rows read row 0 again: one loop shape for every count (its sums unused).
  const float* x0 = x[0];
  const float* x1 = n_rows > 1 ? x[1] : x0;
  const float* x2 = n_rows > 2 ? x[2] : x0;
  const float* x3 = n_rows > 3 ? x[3] : x0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t i = 0; i < n; ++i) {
    s0 += x0[i] * w[i];
    s1 += x1[i] * w[i];
    s2 += x2[i] * w[i];
    s3 += x3[i] * w[i];
  }
  const float sums[4] = {s0, s1, s2, s3};
  for (int64_t r = 0; r < n_rows; ++r) out[r] = sums[r];
}

template <typename scalar_t>
void small_rows_kernel(const scalar_t* const* x_rows, int64_t n_rows, const scalar_t* w,
                       bool columns, int64_t stride_wx, int64_t stride_wy, int64_t dim_x,
                       int64_t dim_y, scalar_t* out) {
  // x's rows widened once.
  std::vector<float> x_buffer(n_rows * dim_x);
  std::array<const float*, kSmallRowsMax> x_f{};
  for (int64_t r = 0; r < n_rows; ++r)
    x_f[r] = vec::as_float(x_rows[r], x_buffer.data() + r * dim_x, dim_x);
  if (columns) {  // columns of w contiguous: dot products
    std::vector<float> column(dim_x), sums(n_rows * dim_y);
    float partial[kSmallRowsMax];
    for (int64_t y = 0; y < dim_y; ++y) {
      const float* w_col = vec::as_float(w + y * stride_wy, column.data(), dim_x);
      dots(x_f.data(), n_rows, w_col, dim_x, partial);
      for (int64_t r = 0; r < n_rows; ++r) sums[r * dim_y + y] = partial[r];
    }
    for (int64_t r = 0; r < n_rows; ++r)
      vec::from_float(sums.data() + r * dim_y, out + r * dim_y, dim_y);
    return;
  }
  // rows of w contiguous: scaled row sums, in x order, kRowBlock rows of w at a time
  // into a partial sum that is then added to the total: one long running sum lost up to
  // 9x BLAS's fp32 accuracy at X = 4096 (a blocked sum is what BLAS does).
  constexpr int64_t kRowBlock = 64;
  std::vector<float> row(dim_y), acc(n_rows * dim_y, 0.0f), partial(n_rows * dim_y);
  for (int64_t x0 = 0; x0 < dim_x; x0 += kRowBlock) {
    std::fill(partial.begin(), partial.end(), 0.0f);
    for (int64_t x = x0; x < std::min(dim_x, x0 + kRowBlock); ++x) {
      const float* w_row = vec::as_float(w + x * stride_wx, row.data(), dim_y);
      for (int64_t r = 0; r < n_rows; ++r)
        vec::axpy(x_f[r][x], w_row, partial.data() + r * dim_y, dim_y);
    }
    vec::axpy(1.0f, partial.data(), acc.data(), n_rows * dim_y);
  }
  for (int64_t r = 0; r < n_rows; ++r)
    vec::from_float(acc.data() + r * dim_y, out + r * dim_y, dim_y);
}

}  // namespace

bool small_rows_mm(const void* const* x_rows, int64_t n_rows, const at::Tensor& w_XY,
                   at::Tensor& out_RY) {
  if (n_rows < 1 || n_rows > kSmallRowsMax || w_XY.dim() != 2 || !out_RY.is_contiguous())
    return false;
  const int64_t dim_x = w_XY.size(0), dim_y = w_XY.size(1);
  const int64_t stride_wx = w_XY.stride(0), stride_wy = w_XY.stride(1);
  // (A dim of size 1 is contiguous whatever its stride.)
  const bool columns = stride_wx == 1 || dim_x == 1, rows = stride_wy == 1 || dim_y == 1;
  if (!columns && !rows) return false;
  // fp32 with contiguous columns: BLAS's gemv was as fast or faster (a decode step of
  // the Mixtral-like block in transformers_bench: 148 us with BLAS, 163 with this).
  if (w_XY.scalar_type() == at::kFloat && !rows) return false;
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    small_rows_kernel<scalar_t>(reinterpret_cast<const scalar_t* const*>(x_rows), n_rows,
                                w_XY.const_data_ptr<scalar_t>(), columns, stride_wx, stride_wy,
                                dim_x, dim_y, out_RY.mutable_data_ptr<scalar_t>());
    return true;
  };
  switch (w_XY.scalar_type()) {  // fp32 accumulation: no float64 here (BLAS keeps it exact)
    case at::kFloat: return run(float{});
    case at::kBFloat16: return run(c10::BFloat16{});
    case at::kHalf: return run(c10::Half{});
    default: return false;
  }
}

}  // namespace dsv3
