// The expert segments of a grouped op's rows, read from offsets_E (int32 cumulative
// ends, as expert_index makes them) and checked once on the host, so that no kernel
// indexes past its rows whatever offsets a caller passes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

namespace dsv3 {

// starts[e] .. starts[e + 1] are expert e's rows (starts[0] = 0, E + 1 entries); rows
// past starts[E] belong to no expert (dropped copies). offsets_E must be non-decreasing
// and <= n_rows, else an error naming the op and the entry.
inline std::vector<int64_t> read_offsets(const at::Tensor& offsets_E, int64_t n_experts,
                                         int64_t n_rows, const char* op) {
  TORCH_CHECK_TYPE(offsets_E.scalar_type() == at::kInt, op, ": offsets_E must be int32");
  TORCH_CHECK_VALUE(offsets_E.dim() == 1 && offsets_E.size(0) == n_experts, op,
                    ": offsets_E must have shape [E=", n_experts, "], got ", offsets_E.sizes());
  const at::Tensor offsets = offsets_E.contiguous();
  const int32_t* data = offsets.const_data_ptr<int32_t>();
  std::vector<int64_t> starts(n_experts + 1, 0);
  for (int64_t e = 0; e < n_experts; ++e) {
    TORCH_CHECK_VALUE(data[e] >= starts[e] && data[e] <= n_rows, op,
                      ": offsets_E must be non-decreasing and <= S=", n_rows, ", got offsets_E[",
                      e, "] = ", data[e], e > 0 ? " after " : " (from 0)",
                      e > 0 ? std::to_string(starts[e]) : std::string());
    starts[e + 1] = data[e];
  }
  return starts;
}

}  // namespace dsv3
