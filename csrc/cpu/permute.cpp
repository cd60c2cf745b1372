// Token permutation on the CPU: a stable counting sort of routed copies by expert,
// the scatter of token rows into expert-grouped order, and the weighted,
// deterministic combine back (a gather per token, summed over k in order: no
// atomics, so results are bitwise identical on repeat). OpenMP over tokens.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <vector>

#include "alloc.h"
#include "../row_shapes.h"
#include "vec_math.h"

namespace dsv3 {
namespace {

constexpr int64_t kTokenGrain = 16;

// Counting sort in chunks: each chunk histograms its copies, the (bin, chunk)
// starts come from one scan, and each chunk then places its copies in order.
// Chunks are contiguous ranges of copies, so the result is stable and independent
// of the thread count. Bin n_experts collects dropped copies (expert id -1).
std::tuple<at::Tensor, at::Tensor> expert_index_cpu(const at::Tensor& experts_TK_in,
                                                    int64_t n_experts) {
  TORCH_CHECK_TYPE(experts_TK_in.scalar_type() == at::kInt, "expert_index: experts_TK must be int32");
  TORCH_CHECK_VALUE(experts_TK_in.dim() == 2, "expert_index: experts_TK must be 2-D [T, K]");
  TORCH_CHECK_VALUE(n_experts >= 1, "expert_index: n_experts must be >= 1, got ", n_experts);
  const at::Tensor experts_TK = experts_TK_in.contiguous();
  const int64_t n_copies = experts_TK.numel(), n_bins = n_experts + 1;
  // offsets_E and row_map_TK are int32: more copies would wrap them (as the CUDA op says)
  TORCH_CHECK_VALUE(n_copies < std::numeric_limits<int32_t>::max(),
                    "expert_index: experts_TK has too many entries for int32 rows: ", n_copies);
  const int32_t* experts = experts_TK.const_data_ptr<int32_t>();
  const int64_t chunk = std::max<int64_t>(4096, (n_copies + at::get_num_threads() - 1) /
                                                    std::max(at::get_num_threads(), 1));
  const int64_t n_chunks = std::max<int64_t>(1, (n_copies + chunk - 1) / chunk);
  std::vector<int64_t> cursor(n_chunks * n_bins, 0);  // [chunk][bin]
  std::atomic<bool> out_of_range{false};

  at::parallel_for(0, n_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      int64_t* hist = cursor.data() + c * n_bins;
      for (int64_t i = c * chunk; i < std::min(n_copies, (c + 1) * chunk); ++i) {
        const int32_t e = experts[i];
        if (e < -1 || e >= n_experts) {
          out_of_range = true;
          continue;
        }
        ++hist[e < 0 ? n_experts : e];
      }
    }
  });
  TORCH_CHECK_VALUE(!out_of_range, "expert_index: experts_TK values must be in [-1, n_experts=",
                    n_experts, ")");
  at::Tensor offsets_E = at::empty({n_experts}, experts_TK.options());
  int32_t* offsets = offsets_E.mutable_data_ptr<int32_t>();
  int64_t running = 0;
  for (int64_t b = 0; b < n_bins; ++b) {
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t count = cursor[c * n_bins + b];
      cursor[c * n_bins + b] = running;
      running += count;
    }
    if (b < n_experts) offsets[b] = static_cast<int32_t>(running);
  }
  at::Tensor row_map_TK = at::empty_like(experts_TK);
  int32_t* row_map = row_map_TK.mutable_data_ptr<int32_t>();
  at::parallel_for(0, n_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      int64_t* next = cursor.data() + c * n_bins;
      for (int64_t i = c * chunk; i < std::min(n_copies, (c + 1) * chunk); ++i) {
        const int32_t e = experts[i];
        row_map[i] = static_cast<int32_t>(next[e < 0 ? n_experts : e]++);
      }
    }
  });
  return {offsets_E, row_map_TK};
}

// A row map indexes raw memory, so a bad one must be caught before any kernel
// uses it; the scan is one pass over T*K ints. It must be a permutation too: with a
// row named twice, the scatters (permute_rows, unpermute_backward) write one of the
// copies and leave another row unwritten, i.e. uninitialized memory in the output.
void check_row_map(const at::Tensor& row_map_TK, int64_t n_rows, const char* op) {
  TORCH_CHECK_TYPE(row_map_TK.scalar_type() == at::kInt, op, ": row_map_TK must be int32");
  TORCH_CHECK_VALUE(row_map_TK.dim() == 2 && row_map_TK.numel() == n_rows, op,
                    ": row_map_TK must be 2-D [T, K] with T*K=", n_rows, " entries, got ",
                    row_map_TK.sizes());
  const at::Tensor rows = row_map_TK.contiguous();
  const int32_t* data = rows.const_data_ptr<int32_t>();
  std::vector<bool> seen(n_rows, false);
  for (int64_t i = 0; i < n_rows; ++i) {
    TORCH_CHECK_VALUE(data[i] >= 0 && data[i] < n_rows, op, ": row_map_TK values must be in [0, ",
                      n_rows, "), got ", data[i]);
    TORCH_CHECK_VALUE(!seen[data[i]], op, ": row_map_TK must map every copy to a row of its own, "
                      "got row ", data[i], " twice");
    seen[data[i]] = true;
  }
}

at::Tensor permute_rows_cpu(const at::Tensor& x_TD_in, const at::Tensor& row_map_TK_in) {
  check_rows_per_token(x_TD_in, row_map_TK_in, "permute_rows", "x_TD");
  check_row_map(row_map_TK_in, row_map_TK_in.numel(), "permute_rows");
  const at::Tensor x_TD = x_TD_in.contiguous(), row_map_TK = row_map_TK_in.contiguous();
  const int64_t n_tokens = x_TD.size(0), top_k = row_map_TK.size(1);
  const int64_t row_bytes = x_TD.size(1) * x_TD.element_size();
  at::Tensor x_SD = empty_output({n_tokens * top_k, x_TD.size(1)}, x_TD.options());
  const char* src = static_cast<const char*>(x_TD.const_data_ptr());
  char* dst = static_cast<char*>(x_SD.mutable_data_ptr());
  const int32_t* row_map = row_map_TK.const_data_ptr<int32_t>();
  at::parallel_for(0, n_tokens, kTokenGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t k = 0; k < top_k; ++k)
        std::memcpy(dst + row_map[t * top_k + k] * row_bytes, src + t * row_bytes, row_bytes);
  });
  return x_SD;
}

// float32 and reduced precision go through float row buffers (vec_math.h);
// float64 (gradcheck) keeps its own precision in the scalar loops below.
template <typename scalar_t>
void unpermute_tokens(const scalar_t* y_rows, const int32_t* row_map, const float* weights,
                      scalar_t* out, int64_t begin, int64_t end, int64_t top_k, int64_t dim) {
  std::vector<float> acc_D(dim), row_D(dim);
  for (int64_t t = begin; t < end; ++t) {
    std::fill(acc_D.begin(), acc_D.end(), 0.0f);
    for (int64_t k = 0; k < top_k; ++k) {
      const float* row = vec::as_float(y_rows + row_map[t * top_k + k] * dim, row_D.data(), dim);
      vec::axpy(weights ? weights[t * top_k + k] : 1.0f, row, acc_D.data(), dim);
    }
    if constexpr (std::is_same_v<scalar_t, float>)
      std::copy(acc_D.begin(), acc_D.end(), out + t * dim);
    else
      vec::from_float(acc_D.data(), out + t * dim, dim);
  }
}

void unpermute_tokens(const double* y_rows, const int32_t* row_map, const double* weights,
                      double* out, int64_t begin, int64_t end, int64_t top_k, int64_t dim) {
  for (int64_t t = begin; t < end; ++t) {
    double* acc = out + t * dim;
    std::fill(acc, acc + dim, 0.0);
    for (int64_t k = 0; k < top_k; ++k) {
      const double* row = y_rows + row_map[t * top_k + k] * dim;
      const double w = weights ? weights[t * top_k + k] : 1.0;
      for (int64_t d = 0; d < dim; ++d) acc[d] += w * row[d];
    }
  }
}

template <typename scalar_t>
void unpermute_backward_tokens(const scalar_t* grad_y, const scalar_t* y_rows,
                               const int32_t* row_map, const float* weights, scalar_t* grad_rows,
                               float* grad_weights, int64_t begin, int64_t end, int64_t top_k,
                               int64_t dim) {
  std::vector<float> grad_D(dim), row_D(dim), scaled_D(dim);
  for (int64_t t = begin; t < end; ++t) {
    const float* g = vec::as_float(grad_y + t * dim, grad_D.data(), dim);
    for (int64_t k = 0; k < top_k; ++k) {
      const int64_t row = row_map[t * top_k + k];
      const float* y = vec::as_float(y_rows + row * dim, row_D.data(), dim);
      grad_weights[t * top_k + k] = vec::dot(g, y, dim);
      if constexpr (std::is_same_v<scalar_t, float>) {
        vec::scale(weights[t * top_k + k], g, grad_rows + row * dim, dim);
      } else {
        vec::scale(weights[t * top_k + k], g, scaled_D.data(), dim);
        vec::from_float(scaled_D.data(), grad_rows + row * dim, dim);
      }
    }
  }
}

void unpermute_backward_tokens(const double* grad_y, const double* y_rows, const int32_t* row_map,
                               const double* weights, double* grad_rows, double* grad_weights,
                               int64_t begin, int64_t end, int64_t top_k, int64_t dim) {
  for (int64_t t = begin; t < end; ++t) {
    const double* g = grad_y + t * dim;
    for (int64_t k = 0; k < top_k; ++k) {
      const int64_t row = row_map[t * top_k + k];
      const double w = weights[t * top_k + k];
      double dot = 0;
      for (int64_t d = 0; d < dim; ++d) {
        grad_rows[row * dim + d] = w * g[d];
        dot += g[d] * y_rows[row * dim + d];
      }
      grad_weights[t * top_k + k] = dot;
    }
  }
}

at::Tensor unpermute_cpu(const at::Tensor& y_SD_in, const at::Tensor& row_map_TK_in,
                         const c10::optional<at::Tensor>& weights_TK_in) {
  check_copy_rows(y_SD_in, "unpermute");  // before size(0): a 0-D y_SD has none
  check_row_map(row_map_TK_in, y_SD_in.size(0), "unpermute");
  check_weights_like_row_map(weights_TK_in, row_map_TK_in, "unpermute");
  const at::Tensor y_SD = y_SD_in.contiguous(), row_map_TK = row_map_TK_in.contiguous();
  const int64_t n_tokens = row_map_TK.size(0), top_k = row_map_TK.size(1), dim = y_SD.size(1);
  at::Tensor y_TD = empty_output({n_tokens, dim}, y_SD.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y_SD.scalar_type(), "unpermute", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor weights_TK;
    if (weights_TK_in.has_value())
      weights_TK = weights_TK_in->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* weights = weights_TK.defined() ? weights_TK.const_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, n_tokens, kTokenGrain, [&](int64_t begin, int64_t end) {
      unpermute_tokens(y_SD.const_data_ptr<scalar_t>(), row_map_TK.const_data_ptr<int32_t>(),
                       weights, y_TD.mutable_data_ptr<scalar_t>(), begin, end, top_k, dim);
    });
  });
  return y_TD;
}

// grad_y_SD[row_map[t, k]] = weights[t, k] * grad_y_TD[t];
// grad_weights[t, k] = <grad_y_TD[t], y_SD[row_map[t, k]]>.
std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(const at::Tensor& grad_y_TD_in,
                                                          const at::Tensor& y_SD_in,
                                                          const at::Tensor& row_map_TK_in,
                                                          const at::Tensor& weights_TK_in) {
  check_copy_rows(y_SD_in, "unpermute_backward");
  check_row_map(row_map_TK_in, y_SD_in.size(0), "unpermute_backward");
  check_rows_per_token(grad_y_TD_in, row_map_TK_in, "unpermute_backward", "grad_y_TD",
                       y_SD_in.size(1));
  check_weights_like_row_map(weights_TK_in, row_map_TK_in, "unpermute_backward");
  const at::Tensor grad_y_TD = grad_y_TD_in.contiguous().to(y_SD_in.scalar_type());
  const at::Tensor y_SD = y_SD_in.contiguous(), row_map_TK = row_map_TK_in.contiguous();
  const int64_t n_tokens = row_map_TK.size(0), top_k = row_map_TK.size(1), dim = y_SD.size(1);
  at::Tensor grad_y_SD = empty_output(y_SD.sizes(), y_SD.options());
  at::Tensor grad_weights_TK;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y_SD.scalar_type(),
                                  "unpermute_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor weights_TK =
        weights_TK_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    grad_weights_TK = at::empty({n_tokens, top_k}, weights_TK.options());
    at::parallel_for(0, n_tokens, kTokenGrain, [&](int64_t begin, int64_t end) {
      unpermute_backward_tokens(
          grad_y_TD.const_data_ptr<scalar_t>(), y_SD.const_data_ptr<scalar_t>(),
          row_map_TK.const_data_ptr<int32_t>(), weights_TK.const_data_ptr<acc_t>(),
          grad_y_SD.mutable_data_ptr<scalar_t>(), grad_weights_TK.mutable_data_ptr<acc_t>(), begin,
          end, top_k, dim);
    });
  });
  return {grad_y_SD, grad_weights_TK.to(weights_TK_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("expert_index", &expert_index_cpu);
  m.impl("permute_rows", &permute_rows_cpu);
  m.impl("unpermute", &unpermute_cpu);
  m.impl("unpermute_backward", &unpermute_backward_cpu);
}

}  // namespace dsv3
