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

#include <cstdint>
#include <cstdlib>
#include <string>
#include <sys/mman.h>

namespace dsv3 {

// DSV3_HUGE_PAGES=0 turns this off (read once).
inline bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("DSV3_HUGE_PAGES");
    return value == nullptr || std::string(value) != "0";
  }();
  return enabled;
}

// The buffer is mapped directly (not through malloc, whose reuse and trimming of
// large blocks made placement, and so speed, vary from run to run), aligned to
// 2 MiB by over-mapping and trimming, and unmapped when the tensor dies.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kHugePage = size_t(2) << 20;
  size_t n_bytes = c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  for (const int64_t size : sizes) n_bytes *= static_cast<size_t>(size);
  if (n_bytes < 2 * kHugePage || options.device().type() != c10::DeviceType::CPU ||
      !huge_pages_enabled())
    return at::empty(sizes, options);
  const size_t padded = (n_bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* mapped = mmap(nullptr, padded + kHugePage, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapped == MAP_FAILED) return at::empty(sizes, options);
  char* begin = static_cast<char*>(mapped);
  char* aligned = reinterpret_cast<char*>(
      (reinterpret_cast<uintptr_t>(begin) + kHugePage - 1) / kHugePage * kHugePage);
  if (aligned > begin) munmap(begin, aligned - begin);
  const size_t tail = (begin + padded + kHugePage) - (aligned + padded);
  if (tail > 0) munmap(aligned + padded, tail);
  madvise(aligned, padded, MADV_HUGEPAGE);  // advisory: a refusal only costs speed
  return at::from_blob(
      aligned, sizes, [padded](void* ptr) { munmap(ptr, padded); }, options);
}

}  // namespace dsv3
