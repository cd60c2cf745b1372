// Grouped expert GEMMs on the CPU: one BLAS call per non-empty expert segment,
// written straight into the output slice. The gathered variant (permute fused in)
// copies one segment's token rows at a time instead of the whole x_SX. Rows past
// the last offset belong to dropped copies and are zero-filled so they carry
// nothing forward. Large segments use multithreaded BLAS one after another;
// many small segments run side by side, one single-threaded BLAS call per thread,
// which avoids paying the threading overhead of BLAS per tiny GEMM. bf16/fp16 segments
// go through fp32 copies on CPUs without native half-precision GEMMs (half_gemm.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "alloc.h"
#include "half_gemm.h"
#include "offsets.h"
#include "small_rows.h"

namespace dsv3 {
namespace {

// Below this many rows per expert (on average) BLAS cannot keep all threads busy.
constexpr int64_t kSmallSegmentRows = 1024;

using ThreadPlan = std::vector<std::vector<int64_t>>;  // experts per thread

int64_t longest(const ThreadPlan& plan, const std::vector<int64_t>& rows) {
  int64_t most = 0;
  for (const auto& experts : plan) {
    int64_t sum = 0;
    for (const int64_t e : experts) sum += rows[e];
    most = std::max(most, sum);
  }
  return most;
}

// Contiguous runs of experts, cut where the running row count crosses each thread's
// share (by the expert's middle row).
ThreadPlan split_contiguous(const std::vector<int64_t>& experts, const std::vector<int64_t>& rows,
                            int64_t n_threads) {
  int64_t total = 0;
  for (const int64_t e : experts) total += rows[e];
  ThreadPlan plan(n_threads);
  int64_t before = 0;
  for (const int64_t e : experts) {
    const int64_t twice_middle = 2 * before + rows[e];
    plan[total == 0 ? 0 : std::min(n_threads - 1, twice_middle * n_threads / (2 * total))]
        .push_back(e);
    before += rows[e];
  }
  return plan;
}

// Largest expert first, each to the least loaded thread.
ThreadPlan split_largest_first(std::vector<int64_t> experts, const std::vector<int64_t>& rows,
                               int64_t n_threads) {
  std::stable_sort(experts.begin(), experts.end(),
                   [&](int64_t a, int64_t b) { return rows[a] > rows[b]; });
  ThreadPlan plan(n_threads);
  std::vector<int64_t> load(n_threads, 0);
  for (const int64_t e : experts) {
    const auto least = std::min_element(load.begin(), load.end()) - load.begin();
    plan[least].push_back(e);
    load[least] += rows[e];
  }
  return plan;
}

// Runs body(e) for every expert segment. Large segments run one after another,
// each with multithreaded BLAS. When the segments are small on average, an expert
// holding more than one thread's share of the rows still runs alone on all threads,
// and the others are split among the threads by rows, one single-threaded BLAS call
// at a time. Splitting the expert range by expert count instead left one thread with
// most of the rows whenever routing was skewed, as it is in trained models (seen:
// 237 of 512 rows on one of 8 experts). Contiguous runs are the rule; dealing
// largest-first is taken only when it shortens the longest thread by over 10%.
// Measured with 2 threads and 8 experts: on skewed routing largest-first was ~10%
// faster; on even routing it interleaves experts across threads and ran fp32 ~30%
// slower than contiguous runs.
template <typename Body>
void for_each_expert(const std::vector<int64_t>& starts, const Body& body) {
  const int64_t n_experts = static_cast<int64_t>(starts.size()) - 1;
  const int64_t n_threads = at::get_num_threads();
  if (starts.back() >= kSmallSegmentRows * n_experts || n_threads == 1) {
    for (int64_t e = 0; e < n_experts; ++e) body(e);
    return;
  }
  std::vector<int64_t> rows(n_experts), shared;
  for (int64_t e = 0; e < n_experts; ++e) rows[e] = starts[e + 1] - starts[e];
  const int64_t share = (starts.back() + n_threads - 1) / n_threads;
  for (int64_t e = 0; e < n_experts; ++e) {
    if (rows[e] > share)
      body(e);
    else
      shared.push_back(e);
  }
  ThreadPlan plan = split_contiguous(shared, rows, n_threads);
  ThreadPlan greedy = split_largest_first(shared, rows, n_threads);
  if (10 * longest(greedy, rows) < 9 * longest(plan, rows)) plan.swap(greedy);
  at::parallel_for(0, n_threads, 1, [&](int64_t begin, int64_t end) {
    // Dispatch guards are thread-local and OpenMP workers do not inherit them.
    at::AutoDispatchBelowADInplaceOrView no_autograd;
    for (int64_t t = begin; t < end; ++t)
      for (const int64_t e : plan[t]) body(e);
  });
}

// Rows [begin, begin + count) of the GEMM input: a slice of x, or with token_S the
// gathered rows x_TX[token_S[begin:begin + count]] (a per-segment temporary).
at::Tensor input_rows(const at::Tensor& x, const at::Tensor& token_S, int64_t begin,
                      int64_t count) {
  if (!token_S.defined()) return x.narrow(0, begin, count);
  return x.index_select(0, token_S.narrow(0, begin, count));
}

// Segments of a few rows (decoding) skip BLAS's fixed cost: see small_rows.h. Their
// rows are read in place, gathered or not (no index_select copy).
bool small_segment_mm(const at::Tensor& x, const at::Tensor& token_S, int64_t begin,
                      int64_t count, const at::Tensor& w_XY, at::Tensor& out) {
  // (The rows are read as w's dtype: grouped_mm_impl has refused mixed dtypes.)
  if (count > kSmallRowsMax || x.scalar_type() != w_XY.scalar_type() ||
      (x.stride(1) != 1 && x.size(1) > 1))
    return false;
  const char* base = static_cast<const char*>(x.const_data_ptr());
  const int64_t row_bytes = x.stride(0) * x.element_size();
  const int32_t* tokens = token_S.defined() ? token_S.const_data_ptr<int32_t>() : nullptr;
  const void* rows[kSmallRowsMax];
  for (int64_t r = 0; r < count; ++r)
    rows[r] = base + (tokens ? tokens[begin + r] : begin + r) * row_bytes;
  return small_rows_mm(rows, count, w_XY, out);
}

at::Tensor grouped_mm_impl(const at::Tensor& x, const at::Tensor& w_EXY, const at::Tensor& offsets_E,
                           const at::Tensor& token_S, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 2 && w_EXY.dim() == 3 && x.size(1) == w_EXY.size(1), op,
                    ": expected x [rows, X] and w_EXY [E, X, Y], got ", x.sizes(), " and ",
                    w_EXY.sizes());
  // BLAS said "expected m1 and m2 to have the same dtype", naming neither op nor argument
  TORCH_CHECK_TYPE(x.scalar_type() == w_EXY.scalar_type(), op, ": x and w_EXY must have one "
                   "dtype, got ", x.scalar_type(), " and ", w_EXY.scalar_type());
  // Autograd is handled by the op; the inner mm_out calls must not see it.
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const int64_t n_rows = token_S.defined() ? token_S.size(0) : x.size(0);
  const int64_t n_experts = w_EXY.size(0);
  const auto starts = read_offsets(offsets_E, n_experts, n_rows, op);
  at::Tensor y_SY = empty_output({n_rows, w_EXY.size(2)}, x.options());
  y_SY.narrow(0, starts.back(), n_rows - starts.back()).zero_();
  const bool in_fp32 = half_gemm_in_fp32(x.scalar_type());
  for_each_expert(starts, [&](int64_t e) {
    const int64_t begin = starts[e], count = starts[e + 1] - begin;
    if (count == 0) return;
    at::Tensor out = y_SY.narrow(0, begin, count);
    const at::Tensor w_XY = w_EXY[e];
    if (small_segment_mm(x, token_S, begin, count, w_XY, out)) return;
    cpu_mm_out(out, input_rows(x, token_S, begin, count), w_XY, in_fp32);
  });
  return y_SY;
}

at::Tensor grouped_mm_cpu(const at::Tensor& x_SX, const at::Tensor& w_EXY,
                          const at::Tensor& offsets_E) {
  return grouped_mm_impl(x_SX, w_EXY, offsets_E, at::Tensor(), "grouped_mm");
}

at::Tensor check_token_index(const at::Tensor& token_S, int64_t n_tokens, const char* op) {
  TORCH_CHECK_TYPE(token_S.scalar_type() == at::kInt, op, ": token_S must be int32");
  TORCH_CHECK_VALUE(token_S.dim() == 1, op, ": token_S must be 1-D, got ", token_S.sizes());
  const at::Tensor index = token_S.contiguous();
  const int32_t* data = index.const_data_ptr<int32_t>();
  for (int64_t s = 0; s < index.size(0); ++s)
    TORCH_CHECK_VALUE(data[s] >= 0 && data[s] < n_tokens, op, ": token_S[", s, "] = ", data[s],
                      " is not a row of x (", n_tokens, " rows)");
  return index;
}

at::Tensor grouped_mm_gather_cpu(const at::Tensor& x_TX, const at::Tensor& w_EXY,
                                 const at::Tensor& offsets_E, const at::Tensor& token_S,
                                 const at::Tensor& /*row_map_TK: for the backward*/) {
  return grouped_mm_impl(x_TX, w_EXY, offsets_E,
                         check_token_index(token_S, x_TX.size(0), "grouped_mm_gather"),
                         "grouped_mm_gather");
}

at::Tensor grouped_mm_wgrad_cpu(const at::Tensor& x, const at::Tensor& grad_y_SY,
                                const at::Tensor& offsets_E, bool transposed,
                                const c10::optional<at::Tensor>& token_S_opt) {
  const char* op = "grouped_mm_wgrad";
  const at::Tensor token_S = token_S_opt.has_value()
                                 ? check_token_index(*token_S_opt, x.size(0), op)
                                 : at::Tensor();
  const int64_t n_rows = token_S.defined() ? token_S.size(0) : x.size(0);
  TORCH_CHECK_VALUE(x.dim() == 2 && grad_y_SY.dim() == 2 && n_rows == grad_y_SY.size(0), op,
                    ": expected x [S, X] (or x_TX with token_S [S]) and grad_y_SY [S, Y], got ",
                    x.sizes(), " and ", grad_y_SY.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == grad_y_SY.scalar_type(), op, ": x and grad_y_SY must "
                   "have one dtype, got ", x.scalar_type(), " and ", grad_y_SY.scalar_type());
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const int64_t n_experts = offsets_E.numel();
  const auto starts = read_offsets(offsets_E, n_experts, n_rows, op);
  const int64_t dim_x = x.size(1), dim_y = grad_y_SY.size(1);
  at::Tensor grad_w = transposed ? empty_output({n_experts, dim_y, dim_x}, x.options())
                                 : empty_output({n_experts, dim_x, dim_y}, x.options());
  const bool in_fp32 = half_gemm_in_fp32(x.scalar_type());
  for_each_expert(starts, [&](int64_t e) {
    const int64_t begin = starts[e], count = starts[e + 1] - begin;
    at::Tensor out = grad_w[e];
    if (count == 0) {
      out.zero_();  // an expert with no tokens gets an exact zero gradient
      return;
    }
    const at::Tensor rows = input_rows(x, token_S, begin, count);
    const at::Tensor dy = grad_y_SY.narrow(0, begin, count);
    if (transposed)
      cpu_mm_out(out, dy.t(), rows, in_fp32);
    else
      cpu_mm_out(out, rows.t(), dy, in_fp32);
  });
  return grad_w;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("grouped_mm", &grouped_mm_cpu);
  m.impl("grouped_mm_gather", &grouped_mm_gather_cpu);
  m.impl("grouped_mm_wgrad", &grouped_mm_wgrad_cpu);
}

}  // namespace dsv3
