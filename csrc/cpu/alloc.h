// Output allocation for the CPU kernels.
//
// Why: a fresh multi-megabyte tensor is page-faulted in 4 KiB at a time on first
// write, and on the VMs we measure on that costs about 0.3 ms per MiB: as much as
// the grouped GEMM itself for the E x D x F weight gradients of fine-grained MoE.
// Large outputs are therefore placed on transparent huge pages (2 MiB, 512x fewer
// faults) when the kernel allows it (THP "madvise" or "always" mode); small ones
// use the regular allocator.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <sys/mman.h>

namespace dsv3 {

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kHugePage = size_t(2) << 20;
  size_t n_bytes = c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  for (const int64_t size : sizes) n_bytes *= static_cast<size_t>(size);
  if (n_bytes < 2 * kHugePage || options.device().type() != c10::DeviceType::CPU)
    return at::empty(sizes, options);
  const size_t padded = (n_bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* data = std::aligned_alloc(kHugePage, padded);
  TORCH_CHECK(data != nullptr, "dsv3: out of memory allocating ", padded, " bytes");
  madvise(data, padded, MADV_HUGEPAGE);  // advisory: a refusal only costs speed
  return at::from_blob(data, sizes, [](void* ptr) { std::free(ptr); }, options);
}

}  // namespace dsv3
