// Grouped expert GEMMs on the CPU: one BLAS call per non-empty expert segment,
// written straight into the output slice (no gather/scatter copies). Rows past
// the last offset belong to dropped copies and are zero-filled so they carry
// nothing forward. Large segments use multithreaded BLAS one after another;
// many small segments run side by side, one single-threaded BLAS call per thread,
// which avoids paying the threading overhead of BLAS per tiny GEMM.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "alloc.h"

namespace dsv3 {
namespace {

// Below this many rows per expert (on average) BLAS cannot keep all threads busy.
constexpr int64_t kSmallSegmentRows = 1024;

std::vector<int64_t> read_offsets(const at::Tensor& offsets_E, int64_t n_experts, int64_t n_rows,
                                  const char* op) {
  TORCH_CHECK_TYPE(offsets_E.scalar_type() == at::kInt, op, ": offsets_E must be int32");
  TORCH_CHECK_VALUE(offsets_E.dim() == 1 && offsets_E.size(0) == n_experts, op,
                    ": offsets_E must have shape [E=", n_experts, "], got ", offsets_E.sizes());
  const at::Tensor offsets = offsets_E.contiguous();
  const int32_t* data = offsets.const_data_ptr<int32_t>();
  std::vector<int64_t> starts(n_experts + 1, 0);
  for (int64_t e = 0; e < n_experts; ++e) {
    TORCH_CHECK_VALUE(data[e] >= starts[e] && data[e] <= n_rows, op,
                      ": offsets_E must be non-decreasing and <= S=", n_rows, ", got ", offsets_E);
    starts[e + 1] = data[e];
  }
  return starts;
}

// Runs body(e) for every non-empty segment, either serially (each call using
// multithreaded BLAS) or one expert per thread.
template <typename Body>
void for_each_expert(const std::vector<int64_t>& starts, const Body& body) {
  const int64_t n_experts = static_cast<int64_t>(starts.size()) - 1;
  const bool small = starts.back() < kSmallSegmentRows * n_experts;
  if (small && at::get_num_threads() > 1) {
    at::parallel_for(0, n_experts, 1, [&](int64_t begin, int64_t end) {
      // Dispatch guards are thread-local and OpenMP workers do not inherit them.
      at::AutoDispatchBelowADInplaceOrView no_autograd;
      for (int64_t e = begin; e < end; ++e) body(e);
    });
  } else {
    for (int64_t e = 0; e < n_experts; ++e) body(e);
  }
}

at::Tensor grouped_mm_cpu(const at::Tensor& x_SX, const at::Tensor& w_EXY,
                          const at::Tensor& offsets_E) {
  TORCH_CHECK_VALUE(x_SX.dim() == 2 && w_EXY.dim() == 3 && x_SX.size(1) == w_EXY.size(1),
                    "grouped_mm: expected x_SX [S, X] and w_EXY [E, X, Y], got ", x_SX.sizes(),
                    " and ", w_EXY.sizes());
  // Autograd is handled by the op; the inner mm_out calls must not see it.
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const int64_t n_rows = x_SX.size(0), n_experts = w_EXY.size(0);
  const auto starts = read_offsets(offsets_E, n_experts, n_rows, "grouped_mm");
  at::Tensor y_SY = empty_output({n_rows, w_EXY.size(2)}, x_SX.options());
  y_SY.narrow(0, starts.back(), n_rows - starts.back()).zero_();
  for_each_expert(starts, [&](int64_t e) {
    const int64_t begin = starts[e], count = starts[e + 1] - begin;
    if (count == 0) return;
    at::Tensor out = y_SY.narrow(0, begin, count);
    at::mm_out(out, x_SX.narrow(0, begin, count), w_EXY[e]);
  });
  return y_SY;
}

at::Tensor grouped_mm_wgrad_cpu(const at::Tensor& x_SX, const at::Tensor& grad_y_SY,
                                const at::Tensor& offsets_E, bool transposed) {
  TORCH_CHECK_VALUE(x_SX.dim() == 2 && grad_y_SY.dim() == 2 && x_SX.size(0) == grad_y_SY.size(0),
                    "grouped_mm_wgrad: expected x_SX [S, X] and grad_y_SY [S, Y], got ",
                    x_SX.sizes(), " and ", grad_y_SY.sizes());
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const int64_t n_rows = x_SX.size(0), n_experts = offsets_E.numel();
  const auto starts = read_offsets(offsets_E, n_experts, n_rows, "grouped_mm_wgrad");
  const int64_t dim_x = x_SX.size(1), dim_y = grad_y_SY.size(1);
  at::Tensor grad_w = transposed ? empty_output({n_experts, dim_y, dim_x}, x_SX.options())
                                 : empty_output({n_experts, dim_x, dim_y}, x_SX.options());
  for_each_expert(starts, [&](int64_t e) {
    const int64_t begin = starts[e], count = starts[e + 1] - begin;
    at::Tensor out = grad_w[e];
    if (count == 0) {
      out.zero_();  // an expert with no tokens gets an exact zero gradient
      return;
    }
    const at::Tensor x = x_SX.narrow(0, begin, count), dy = grad_y_SY.narrow(0, begin, count);
    if (transposed)
      at::mm_out(out, dy.t(), x);
    else
      at::mm_out(out, x.t(), dy);
  });
  return grad_w;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("grouped_mm", &grouped_mm_cpu);
  m.impl("grouped_mm_wgrad", &grouped_mm_wgrad_cpu);
}

}  // namespace dsv3
