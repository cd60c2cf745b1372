// A grouped GEMM's segments of a few rows each (decoding: one token's copy per routed
// expert). There a BLAS call costs mostly its fixed overhead (measured here: ~16 us
// for a 1 x 256 x 256 bf16 at::mm, most of a decode step's expert time), so the rows
// are computed with plain vectorized dot products and row updates instead, in fp32.
// Taken for bf16 and fp16, and for fp32 where w's rows are contiguous; fp32 with
// contiguous columns stays with BLAS, whose gemv was as fast or faster there.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace dsv3 {

// At most this many rows take the path below; more go to BLAS.
constexpr int64_t kSmallRowsMax = 4;

// out_RY = x_RX @ w_XY for R = n_rows rows of x, row r at x_rows[r] (contiguous, X
// values), into out_RY (contiguous R x Y). Returns false, computing nothing, when the
// dtype or w's layout does not suit (see above, or neither of its dims contiguous);
// the caller then uses BLAS. Accumulates in fp32 (for float, bf16 and half); deterministic.
bool small_rows_mm(const void* const* x_rows, int64_t n_rows, const at::Tensor& w_XY,
                   at::Tensor& out_RY);

}  // namespace dsv3
