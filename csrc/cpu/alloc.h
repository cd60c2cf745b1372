// Output allocation for the CPU kernels.
//
// Why: a fresh multi-megabyte tensor is page-faulted in 4 KiB at a time on first
// write and unmapped (a TLB shootdown across threads) when freed; on the VMs we
// measure on that costs as much as the grouped GEMM itself for the E x D x F weight
// gradients of fine-grained MoE. Large outputs therefore go on transparent huge
// pages (2 MiB: 512x fewer faults), and freed ones are kept for reuse: a training
// step allocates the same sizes every step, so they come back already faulted in.
// Measured on the 2-core VM (benchmarks/output_cache.py; RESULTS.md, "CPU output
// cache on and off"): the layer's median step 4-11% faster and its mean 9-26% than
// mapping each output afresh, which also made 3-10% of steps over 1.6x the fastest.
//
// Memory: a kept block is memory held for nothing until reused, so (1) a request
// takes the smallest kept block that holds it, however much larger (it is resident
// anyway), and (2) a request that no kept block holds first unmaps every kept block
// (all smaller than it: idle), so idle blocks never pile up beside new mappings. A
// step's peak then stays near that of mapping afresh (the layer benchmark's, in a
// fresh process: 5-24% above it, still below the per-expert reference loop's), and
// DSV3_CPU_CACHE_MB (default 512, 0: keep none) caps what is kept.
// Small outputs use the regular allocator.
#pragma once

#include <ATen/ATen.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <sys/mman.h>

namespace dsv3 {

// Environment knobs, read once: DSV3_HUGE_PAGES=0 turns this path off;
// DSV3_CPU_CACHE_MB caps the bytes kept for reuse (default kDefaultCacheMiB; 0: none).
struct OutputCache {
  static constexpr long long kDefaultCacheMiB = 512;
  std::mutex mutex;
  std::multimap<size_t, void*> free_blocks;  // padded size -> mapping
  size_t cached_bytes = 0;
  size_t limit_bytes = 0;
  bool enabled = true;

  OutputCache() {
    const char* huge = std::getenv("DSV3_HUGE_PAGES");
    enabled = huge == nullptr || std::string(huge) != "0";
    limit_bytes = cache_limit_bytes();
  }

  // DSV3_CPU_CACHE_MB as bytes. atoll took "-5" to a size_t near 2^64 (a cache without
  // bound) and "abc" to 0 without a word: a value that is not a whole number of MiB
  // >= 0 keeps no cache, and says so.
  static size_t cache_limit_bytes() {
    const char* text = std::getenv("DSV3_CPU_CACHE_MB");
    if (text == nullptr || *text == '\0') return static_cast<size_t>(kDefaultCacheMiB) << 20;
    char* end = nullptr;
    errno = 0;
    const long long mib = std::strtoll(text, &end, 10);  // skips leading whitespace
    while (*end == ' ' || *end == '\t' || *end == '\n') ++end;  // and so, trailing
    if (errno != 0 || end == text || *end != '\0' || mib < 0 || mib > (1LL << 40)) {
      TORCH_WARN("DSV3_CPU_CACHE_MB must be a whole number of MiB >= 0, got '", text,
                 "': the CPU kernels keep no freed outputs");
      return 0;
    }
    return static_cast<size_t>(mib) << 20;
  }

  struct Block {
    void* data;
    size_t size;
  };

  // The smallest kept block of at least ``padded`` bytes; or, where none is, {} after
  // unmapping every kept block (all too small for this request, and idle).
  Block take(size_t padded) {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = free_blocks.lower_bound(padded);
    if (it == free_blocks.end()) {
      release_locked();
      return {nullptr, 0};
    }
    const Block block{it->second, it->first};
    free_blocks.erase(it);
    cached_bytes -= block.size;
    return block;
  }

  void give_back(void* block, size_t padded) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (cached_bytes + padded <= limit_bytes) {
        free_blocks.emplace(padded, block);
        cached_bytes += padded;
        return;
      }
    }
    munmap(block, padded);
  }

  // Unmaps every cached block; returns the bytes released.
  size_t release() {
    std::lock_guard<std::mutex> lock(mutex);
    return release_locked();
  }

  size_t release_locked() {
    for (const auto& [padded, block] : free_blocks) munmap(block, padded);
    free_blocks.clear();
    const size_t released = cached_bytes;
    cached_bytes = 0;
    return released;
  }

  static OutputCache& instance() {
    static OutputCache* cache = new OutputCache();  // never destroyed: deleters may run at exit
    return *cache;
  }
};

// A 2 MiB-aligned anonymous mapping (over-mapped, then trimmed) advised onto huge
// pages, or nullptr. Mapped directly, not through malloc, whose reuse and trimming
// of large blocks made placement, and so speed, vary from run to run.
inline void* map_huge(size_t padded, size_t huge_page) {
  void* mapped = mmap(nullptr, padded + huge_page, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapped == MAP_FAILED) return nullptr;
  char* begin = static_cast<char*>(mapped);
  char* aligned = reinterpret_cast<char*>(
      (reinterpret_cast<uintptr_t>(begin) + huge_page - 1) / huge_page * huge_page);
  if (aligned > begin) munmap(begin, aligned - begin);
  const size_t tail = (begin + padded + huge_page) - (aligned + padded);
  if (tail > 0) munmap(aligned + padded, tail);
  madvise(aligned, padded, MADV_HUGEPAGE);  // advisory: a refusal only costs speed
  return aligned;
}

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kHugePage = size_t(2) << 20;
  OutputCache& cache = OutputCache::instance();
  size_t n_bytes = c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  for (const int64_t size : sizes) n_bytes *= static_cast<size_t>(size);
  if (n_bytes < 2 * kHugePage || options.device().type() != c10::DeviceType::CPU ||
      !cache.enabled)
    return at::empty(sizes, options);
  const size_t padded = (n_bytes + kHugePage - 1) / kHugePage * kHugePage;
  OutputCache::Block block = cache.take(padded);
  if (block.data == nullptr) block = {map_huge(padded, kHugePage), padded};
  if (block.data == nullptr) return at::empty(sizes, options);
  const size_t size = block.size;
  return at::from_blob(
      block.data, sizes, [size](void* ptr) { OutputCache::instance().give_back(ptr, size); },
      options);
}

}  // namespace dsv3
