// Shape checks that every backend of the row-movement ops repeats. The kernels (C++,
// CUDA and Triton) index x and grad rows by token and the weights by (token, k), and a
// direct torch.ops call reaches them without the Python wrappers' checks: a tensor
// with too few rows would be read past its end.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace dsv3 {

inline void check_row_map_shape(const at::Tensor& row_map_TK, const char* op) {
  TORCH_CHECK_VALUE(row_map_TK.dim() == 2, op, ": row_map_TK must be 2-D [T, K], got ",
                    row_map_TK.sizes());
}

// `rows_TD` has one row per token of row_map_TK [T, K] and, if dim >= 0, dim columns.
inline void check_rows_per_token(const at::Tensor& rows_TD, const at::Tensor& row_map_TK,
                                 const char* op, const char* name, int64_t dim = -1) {
  check_row_map_shape(row_map_TK, op);
  TORCH_CHECK_VALUE(rows_TD.dim() == 2 && rows_TD.size(0) == row_map_TK.size(0) &&
                        (dim < 0 || rows_TD.size(1) == dim),
                    op, ": ", name, " must be [T=", row_map_TK.size(0), ", ",
                    dim < 0 ? "D" : std::to_string(dim), "] (one row per token of row_map_TK), got ",
                    rows_TD.sizes());
}

// y_SD, the rows the permuted copies live in, is 2-D [S, D].
inline void check_copy_rows(const at::Tensor& y_SD, const char* op) {
  TORCH_CHECK_VALUE(y_SD.dim() == 2, op, ": y_SD must be 2-D [S, D], got ", y_SD.sizes());
}

// weights_TK, when given, has row_map_TK's shape [T, K].
inline void check_weights_like_row_map(const c10::optional<at::Tensor>& weights_TK,
                                       const at::Tensor& row_map_TK, const char* op) {
  TORCH_CHECK_VALUE(!weights_TK.has_value() || weights_TK->sizes() == row_map_TK.sizes(), op,
                    ": weights_TK must have row_map_TK's shape ", row_map_TK.sizes(), ", got ",
                    weights_TK->sizes());
  // Routing weights are probabilities: integer ones were cast and summed as given.
  TORCH_CHECK_TYPE(!weights_TK.has_value() || at::isFloatingType(weights_TK->scalar_type()), op,
                   ": weights_TK must be a floating-point tensor, got ",
                   weights_TK->scalar_type());
}

// Every tensor on `ref`'s device. The dispatcher runs the CUDA kernel when any argument
// is a CUDA tensor, and the kernel reads each through a raw pointer: a row map or
// weights left on the CPU (or on another GPU) was dereferenced there, an illegal
// address that ends the CUDA context.
inline void check_same_device(const at::Tensor& ref, const char* ref_name,
                              const at::Tensor& other, const char* name, const char* op) {
  TORCH_CHECK_VALUE(other.device() == ref.device(), op, ": ", name, " must be on ", ref_name,
                    "'s device ", ref.device(), ", got ", other.device());
}

// The copies' rows y_SD [S, D] are row_map_TK's S = T * K rows, each named once: a row
// the map does not name was left unwritten in a gradient (uninitialized memory).
inline void check_copy_rows_match(const at::Tensor& y_SD, const at::Tensor& row_map_TK,
                                  const char* op) {
  TORCH_CHECK_VALUE(y_SD.size(0) == row_map_TK.numel(), op, ": y_SD must have T * K = ",
                    row_map_TK.numel(), " rows (one per entry of row_map_TK), got ",
                    y_SD.size(0));
}

}  // namespace dsv3
