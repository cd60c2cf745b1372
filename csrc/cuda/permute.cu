// Token permutation on CUDA: the stable counting sort of routed copies by expert
// (per-block histograms, one device-wide scan, per-block stable placement: integer work only,
// so the result is exact and deterministic, and nothing is read back to the host),
// the scatter of token rows with 16-byte accesses, and the deterministic combine
// (one program per token, summed over k in order in fp32: no atomics).
// Raw pointers and the current stream only; registered under the CUDA key.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../row_shapes.h"

namespace dsv3 {
namespace {

constexpr int kBlock = 256;
// expert_index histogram: (n_experts + 1) ints of dynamic shared memory within 48 KiB.
constexpr int64_t kMaxExperts = 48 * 1024 / sizeof(int);

// Bin of a copy: its expert, or n_experts for a dropped copy (id -1) and for an
// out-of-range id.
__device__ __forceinline__ int bin_index(int32_t expert, int n_experts) {
  return expert < 0 || expert >= n_experts ? n_experts : expert;
}

// The same, flagging an out-of-range id so that the host-side op can report it.
__device__ __forceinline__ int bin_of(int32_t expert, int n_experts, int* bad) {
  if (expert < -1 || expert >= n_experts) atomicExch(bad, 1);
  return bin_index(expert, n_experts);
}

// hist is bin-major, hist[bin * n_blocks + block]: then the first row of (block, bin)
// is the exclusive prefix sum of hist in memory order (all copies of smaller bins,
// then this bin's copies in earlier blocks), so one flat device-wide scan does it.
__global__ void block_histogram_kernel(const int32_t* experts, int64_t n_copies, int n_experts,
                                       int* hist, int* bad) {
  extern __shared__ int counts[];
  const int n_bins = n_experts + 1;
  for (int b = threadIdx.x; b < n_bins; b += blockDim.x) counts[b] = 0;
  __syncthreads();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n_copies) atomicAdd(&counts[bin_of(experts[i], n_experts, bad)], 1);
  __syncthreads();
  for (int b = threadIdx.x; b < n_bins; b += blockDim.x)
    hist[static_cast<int64_t>(b) * gridDim.x + blockIdx.x] = counts[b];
}

// Stable placement: a copy's row is its (block, bin) start plus the number of
// copies before it in the block with the same bin. Block 0 also writes offsets_E,
// the cumulative ends: expert e ends where bin e + 1 starts.
__global__ void place_kernel(const int32_t* experts, int64_t n_copies, int n_experts,
                             const int* starts, int32_t* row_map, int32_t* offsets) {
  __shared__ int bins[kBlock];
  const int n_blocks = gridDim.x;
  if (blockIdx.x == 0)
    for (int e = threadIdx.x; e < n_experts; e += blockDim.x)
      offsets[e] = starts[static_cast<int64_t>(e + 1) * n_blocks];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // Out-of-range ids were flagged by the histogram; here they only need the same bin.
  const int bin = i < n_copies ? bin_index(experts[i], n_experts) : -1;
  bins[threadIdx.x] = bin;
  __syncthreads();
  if (i >= n_copies) return;
  int rank = 0;
  for (int j = 0; j < static_cast<int>(threadIdx.x); ++j) rank += bins[j] == bin;
  row_map[i] = starts[static_cast<int64_t>(bin) * n_blocks + blockIdx.x] + rank;
}

std::tuple<at::Tensor, at::Tensor> expert_index_cuda(const at::Tensor& experts_TK_in,
                                                     int64_t n_experts) {
  TORCH_CHECK_TYPE(experts_TK_in.scalar_type() == at::kInt, "expert_index: experts_TK must be int32");
  TORCH_CHECK_VALUE(experts_TK_in.dim() == 2, "expert_index: experts_TK must be 2-D [T, K]");
  TORCH_CHECK_VALUE(n_experts >= 1, "expert_index: n_experts must be >= 1, got ", n_experts);
  // One int of shared memory per expert (and one more) in the histogram kernel, which
  // launches with the default 48 KiB: past it the launch fails with a bare CUDA error.
  TORCH_CHECK_VALUE(n_experts < kMaxExperts, "expert_index: n_experts must be < ", kMaxExperts,
                    " on CUDA (the histogram's shared memory), got ", n_experts);
  const c10::cuda::CUDAGuard guard(experts_TK_in.device());
  const at::Tensor experts_TK = experts_TK_in.contiguous();
  const int64_t n_copies = experts_TK.numel();
  TORCH_CHECK_VALUE(n_copies < std::numeric_limits<int32_t>::max(),
                    "expert_index: experts_TK has too many entries for int32 rows: ", n_copies);
  const auto int_options = experts_TK.options();
  at::Tensor row_map_TK = at::empty_like(experts_TK);
  if (n_copies == 0) return {at::zeros({n_experts}, int_options), row_map_TK};
  const int n_blocks = static_cast<int>((n_copies + kBlock - 1) / kBlock);
  const int64_t n_counts = static_cast<int64_t>(n_blocks) * (n_experts + 1);
  TORCH_CHECK_VALUE(n_counts < std::numeric_limits<int32_t>::max(),
                    "expert_index: too many (block, expert) counts for one scan: ", n_counts);
  at::Tensor offsets_E = at::empty({n_experts}, int_options);
  // hist and the out-of-range flag live in one buffer: a single allocation.
  at::Tensor scratch = at::empty({n_counts + 1}, int_options);
  int* hist = scratch.mutable_data_ptr<int>();
  int* bad = hist + n_counts;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(bad, 0, sizeof(int), stream));
  block_histogram_kernel<<<n_blocks, kBlock, (n_experts + 1) * sizeof(int), stream>>>(
      experts_TK.const_data_ptr<int32_t>(), n_copies, n_experts, hist, bad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // In place, device-wide; the temporary storage comes from the caching allocator, so
  // nothing syncs and the whole op stays capturable in a CUDA graph.
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, temp_bytes, hist, hist,
                                               static_cast<int>(n_counts), stream));
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, int_options.dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp.mutable_data_ptr(), temp_bytes, hist, hist,
                                               static_cast<int>(n_counts), stream));
  place_kernel<<<n_blocks, kBlock, 0, stream>>>(experts_TK.const_data_ptr<int32_t>(), n_copies,
                                               n_experts, hist,
                                               row_map_TK.mutable_data_ptr<int32_t>(),
                                               offsets_E.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // An out-of-range id is reported without a host sync: a device-side assert.
  at::_assert_async(scratch[-1] == 0, "expert_index: experts_TK values must be in [-1, n_experts)");
  return {offsets_E, row_map_TK};
}

// One block per token: copies the row to its K destinations, 16 bytes at a time
// when rows are 16-byte aligned, else one element at a time. Each thread loads
// kUnroll pieces of the row before storing them K times: the row is read from memory
// once, and several loads are in flight per thread (one at a time left the H200 at
// under half its bandwidth).
constexpr int kUnroll = 4;

// row_map_TK comes from the caller: an entry outside [0, n_rows) clears the "row map
// was good" flag (the host raises through a device-side assert, no sync) and its row
// is neither read nor written. Every thread of a block reads the same entries, so the
// skips are uniform across the block. Thread 0 checks the token's entries up front,
// so that rows of any width (zero included) are checked.
__device__ __forceinline__ bool row_in_range(int64_t row, int64_t n_rows) {
  return row >= 0 && row < n_rows;
}

__device__ __forceinline__ void check_token_rows(const int32_t* row_map, int64_t token, int top_k,
                                                 int64_t n_rows, int32_t* ok) {
  if (threadIdx.x != 0) return;
  for (int k = 0; k < top_k; ++k)
    if (!row_in_range(row_map[token * top_k + k], n_rows)) *ok = 0;
}

// The flag the kernels clear; the host checks it with at::_assert_async once they ran.
at::Tensor good_flag(const at::Tensor& like) {
  return at::ones({1}, like.options().dtype(at::kInt));
}

template <typename vec_t>
__global__ void permute_rows_kernel(const vec_t* x, const int32_t* row_map, vec_t* out,
                                    int32_t* ok, int64_t n_rows, int64_t row_vecs, int top_k) {
  const int64_t token = blockIdx.x;
  check_token_rows(row_map, token, top_k, n_rows, ok);
  const vec_t* src = x + token * row_vecs;
  for (int64_t base = threadIdx.x; base < row_vecs; base += kUnroll * blockDim.x) {
    vec_t piece[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t v = base + j * blockDim.x;
      if (v < row_vecs) piece[j] = src[v];
    }
    for (int k = 0; k < top_k; ++k) {
      const int64_t row = row_map[token * top_k + k];
      if (!row_in_range(row, n_rows)) continue;
      vec_t* dst = out + row * row_vecs;
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) {
        const int64_t v = base + j * blockDim.x;
        if (v < row_vecs) dst[v] = piece[j];
      }
    }
  }
}

at::Tensor permute_rows_cuda(const at::Tensor& x_TD_in, const at::Tensor& row_map_TK_in) {
  check_rows_per_token(x_TD_in, row_map_TK_in, "permute_rows", "x_TD");
  check_same_device(x_TD_in, "x_TD", row_map_TK_in, "row_map_TK", "permute_rows");
  const c10::cuda::CUDAGuard guard(x_TD_in.device());
  const at::Tensor x_TD = x_TD_in.contiguous(), row_map_TK = row_map_TK_in.contiguous();
  const int64_t n_tokens = x_TD.size(0), top_k = row_map_TK.size(1);
  at::Tensor x_SD = at::empty({n_tokens * top_k, x_TD.size(1)}, x_TD.options());
  if (n_tokens == 0) return x_SD;
  const int64_t row_bytes = x_TD.size(1) * x_TD.element_size();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int32_t* rows = row_map_TK.const_data_ptr<int32_t>();
  const bool aligned = row_bytes % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(x_TD.const_data_ptr()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(x_SD.const_data_ptr()) % 16 == 0;
  const at::Tensor ok = good_flag(row_map_TK);
  const int64_t n_rows = x_SD.size(0);
  if (aligned) {
    permute_rows_kernel<uint4><<<n_tokens, 128, 0, stream>>>(
        static_cast<const uint4*>(x_TD.const_data_ptr()), rows,
        static_cast<uint4*>(x_SD.mutable_data_ptr()), ok.mutable_data_ptr<int32_t>(), n_rows,
        row_bytes / 16, top_k);
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_TD.scalar_type(), "permute_rows", [&] {
      permute_rows_kernel<scalar_t><<<n_tokens, 128, 0, stream>>>(
          x_TD.const_data_ptr<scalar_t>(), rows, x_SD.mutable_data_ptr<scalar_t>(),
          ok.mutable_data_ptr<int32_t>(), n_rows, x_TD.size(1), top_k);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::_assert_async(ok, "permute_rows: row_map_TK values must be in [0, S)");
  return x_SD;
}

// One block per token: out[t] = sum_k w[t, k] * y[row_map[t, k]], summed over k in
// order in fp32 (deterministic, no atomics). kVec elements per access: 16 bytes when
// rows are 16-byte aligned, else 1. The k loop is unrolled so that several rows'
// loads are in flight before the first multiply-add needs one.
template <typename scalar_t, typename weight_t, int kVec>
__global__ void unpermute_kernel(const scalar_t* y, const int32_t* row_map, const weight_t* weights,
                                 scalar_t* out, int32_t* ok, int64_t n_rows, int64_t dim,
                                 int top_k) {
  using acc_t = at::opmath_type<scalar_t>;
  struct alignas(sizeof(scalar_t) * kVec) Piece { scalar_t v[kVec]; };
  const int64_t token = blockIdx.x;
  check_token_rows(row_map, token, top_k, n_rows, ok);
  for (int64_t p = threadIdx.x; p < dim / kVec; p += blockDim.x) {
    acc_t acc[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[i] = 0;
#pragma unroll 4
    for (int k = 0; k < top_k; ++k) {
      const acc_t w = weights ? static_cast<acc_t>(weights[token * top_k + k]) : acc_t(1);
      const int64_t row = row_map[token * top_k + k];
      if (!row_in_range(row, n_rows)) continue;
      const Piece piece = reinterpret_cast<const Piece*>(y + row * dim)[p];
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] += w * static_cast<acc_t>(piece.v[i]);
    }
    Piece result;
#pragma unroll
    for (int i = 0; i < kVec; ++i) result.v[i] = static_cast<scalar_t>(acc[i]);
    reinterpret_cast<Piece*>(out + token * dim)[p] = result;
  }
}

at::Tensor unpermute_cuda(const at::Tensor& y_SD_in, const at::Tensor& row_map_TK_in,
                          const c10::optional<at::Tensor>& weights_TK_in) {
  check_copy_rows(y_SD_in, "unpermute");
  check_row_map_shape(row_map_TK_in, "unpermute");
  check_weights_like_row_map(weights_TK_in, row_map_TK_in, "unpermute");
  check_copy_rows_match(y_SD_in, row_map_TK_in, "unpermute");
  check_same_device(y_SD_in, "y_SD", row_map_TK_in, "row_map_TK", "unpermute");
  if (weights_TK_in.has_value()) {
    check_same_device(y_SD_in, "y_SD", *weights_TK_in, "weights_TK", "unpermute");
  }
  const c10::cuda::CUDAGuard guard(y_SD_in.device());
  const at::Tensor y_SD = y_SD_in.contiguous(), row_map_TK = row_map_TK_in.contiguous();
  const int64_t n_tokens = row_map_TK.size(0), top_k = row_map_TK.size(1), dim = y_SD.size(1);
  at::Tensor y_TD = at::empty({n_tokens, dim}, y_SD.options());
  if (n_tokens == 0) return y_TD;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor ok = good_flag(row_map_TK);
  int32_t* ok_ptr = ok.mutable_data_ptr<int32_t>();
  const int64_t n_rows = y_SD.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y_SD.scalar_type(), "unpermute", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor weights_TK;
    if (weights_TK_in.has_value())
      weights_TK = weights_TK_in->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    constexpr int vec = 16 / sizeof(scalar_t);
    const bool aligned = (dim * sizeof(scalar_t)) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(y_SD.const_data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(y_TD.const_data_ptr()) % 16 == 0;
    const auto* weights = weights_TK.defined() ? weights_TK.const_data_ptr<acc_t>() : nullptr;
    if (aligned) {
      unpermute_kernel<scalar_t, acc_t, vec><<<n_tokens, 128, 0, stream>>>(
          y_SD.const_data_ptr<scalar_t>(), row_map_TK.const_data_ptr<int32_t>(), weights,
          y_TD.mutable_data_ptr<scalar_t>(), ok_ptr, n_rows, dim, top_k);
    } else {
      unpermute_kernel<scalar_t, acc_t, 1><<<n_tokens, 256, 0, stream>>>(
          y_SD.const_data_ptr<scalar_t>(), row_map_TK.const_data_ptr<int32_t>(), weights,
          y_TD.mutable_data_ptr<scalar_t>(), ok_ptr, n_rows, dim, top_k);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::_assert_async(ok, "unpermute: row_map_TK values must be in [0, S)");
  return y_TD;
}

// The unpermute's backward, one block per (token, column block), as the forward reads:
// grad_y_SD[row_map[t, k]] = w[t, k] * grad[t] for every k, the token's piece of grad
// read once for its K copies, and the routing weights' gradient as each block's partial
// dots of grad[t] and y_SD[row_map[t, k]], summed over the blocks afterwards by torch's
// sum (the same bits every run). A block per token walking the whole row once per copy,
// with a block reduction and two barriers after each, reached 0.70 of copy bandwidth on
// an H200 at DeepSeek-V3's T16384 D7168 K8 (run 4); the forward in this layout, 0.95.
constexpr int kDotChunk = 8;  // copies whose partial dots a thread holds at once

template <typename scalar_t, int kVec>
__global__ void unpermute_backward_kernel(const scalar_t* grad, const scalar_t* y,
                                          const int32_t* row_map,
                                          const at::opmath_type<scalar_t>* weights,
                                          scalar_t* grad_rows,
                                          at::opmath_type<scalar_t>* partial_dots, int32_t* ok,
                                          int64_t n_rows, int64_t dim, int top_k) {
  using acc_t = at::opmath_type<scalar_t>;
  struct alignas(sizeof(scalar_t) * kVec) Piece { scalar_t v[kVec]; };
  __shared__ acc_t warp_sums[kDotChunk][32];
  const int64_t token = blockIdx.x;
  const int64_t piece = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const bool live = piece < dim / kVec;
  if (blockIdx.y == 0) check_token_rows(row_map, token, top_k, n_rows, ok);
  Piece g{};
  if (live) g = reinterpret_cast<const Piece*>(grad + token * dim)[piece];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  for (int first = 0; first < top_k; first += kDotChunk) {
    // The chunk's rows and weights first, then all its loads of y, then the math: each
    // copy's load would otherwise wait on its row's, one copy after another.
    int64_t rows[kDotChunk];
    acc_t copy_weights[kDotChunk];
    bool used[kDotChunk];
#pragma unroll
    for (int j = 0; j < kDotChunk; ++j) {
      const int k = first + j;
      rows[j] = k < top_k ? row_map[token * top_k + k] : -1;
      copy_weights[j] = k < top_k ? weights[token * top_k + k] : acc_t(0);
      used[j] = live && row_in_range(rows[j], n_rows);
    }
    Piece y_pieces[kDotChunk];
#pragma unroll
    for (int j = 0; j < kDotChunk; ++j)
      if (used[j]) y_pieces[j] = reinterpret_cast<const Piece*>(y + rows[j] * dim)[piece];
    acc_t dots[kDotChunk];
#pragma unroll
    for (int j = 0; j < kDotChunk; ++j) {
      dots[j] = 0;
      if (!used[j]) continue;
      const acc_t w = copy_weights[j];
      Piece out;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const acc_t g_i = static_cast<acc_t>(g.v[i]);
        out.v[i] = static_cast<scalar_t>(w * g_i);
        dots[j] += g_i * static_cast<acc_t>(y_pieces[j].v[i]);
      }
      reinterpret_cast<Piece*>(grad_rows + rows[j] * dim)[piece] = out;
    }
    // Each copy's dot over the block in a fixed order: a shuffle tree in each warp, then
    // the warps' sums in order.
#pragma unroll
    for (int j = 0; j < kDotChunk; ++j) {
      if (first + j >= top_k) break;  // the same for the whole block: top-2 reduces two
      acc_t dot = dots[j];
      for (int offset = 16; offset > 0; offset /= 2)
        dot += __shfl_down_sync(0xffffffff, dot, offset);
      if (lane == 0) warp_sums[j][warp] = dot;
    }
    __syncthreads();
    if (threadIdx.x < kDotChunk && first + static_cast<int>(threadIdx.x) < top_k) {
      acc_t total = 0;
      for (int w = 0; w < n_warps; ++w) total += warp_sums[threadIdx.x][w];
      partial_dots[(token * top_k + first + threadIdx.x) * gridDim.y + blockIdx.y] = total;
    }
    __syncthreads();  // warp_sums is reused by the next chunk of copies
  }
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(const at::Tensor& grad_y_TD_in,
                                                           const at::Tensor& y_SD_in,
                                                           const at::Tensor& row_map_TK_in,
                                                           const at::Tensor& weights_TK_in) {
  check_copy_rows(y_SD_in, "unpermute_backward");
  check_rows_per_token(grad_y_TD_in, row_map_TK_in, "unpermute_backward", "grad_y_TD",
                       y_SD_in.size(1));
  check_weights_like_row_map(weights_TK_in, row_map_TK_in, "unpermute_backward");
  check_copy_rows_match(y_SD_in, row_map_TK_in, "unpermute_backward");
  check_same_device(y_SD_in, "y_SD", row_map_TK_in, "row_map_TK", "unpermute_backward");
  check_same_device(y_SD_in, "y_SD", weights_TK_in, "weights_TK", "unpermute_backward");
  check_same_device(y_SD_in, "y_SD", grad_y_TD_in, "grad_y_TD", "unpermute_backward");
  const c10::cuda::CUDAGuard guard(y_SD_in.device());
  const at::Tensor y_SD = y_SD_in.contiguous(), row_map_TK = row_map_TK_in.contiguous();
  const at::Tensor grad_y_TD = grad_y_TD_in.contiguous().to(y_SD.scalar_type());
  const int64_t n_tokens = row_map_TK.size(0), top_k = row_map_TK.size(1), dim = y_SD.size(1);
  at::Tensor grad_y_SD = at::empty_like(y_SD);
  at::Tensor grad_weights_TK;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor ok = good_flag(row_map_TK);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y_SD.scalar_type(),
                                  "unpermute_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor weights_TK =
        weights_TK_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    grad_weights_TK = at::empty({n_tokens, top_k}, weights_TK.options());  // kept if empty
    if (n_tokens > 0 && top_k > 0) {
      constexpr int vec = 16 / sizeof(scalar_t);
      const bool aligned = (dim * sizeof(scalar_t)) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(grad_y_TD.const_data_ptr()) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(y_SD.const_data_ptr()) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(grad_y_SD.const_data_ptr()) % 16 == 0;
      const auto launch = [&](auto kernel, int threads, int64_t per_thread) {
        // At least one block a token, so that rows of zero width still check row_map_TK.
        const int64_t blocks = std::max<int64_t>((dim / per_thread + threads - 1) / threads, 1);
        TORCH_CHECK_VALUE(blocks <= 65535, "unpermute_backward: y_SD's rows are too wide (",
                          dim, " values) for one launch");
        const at::Tensor partial_TKB =
            at::empty({n_tokens, top_k, blocks}, weights_TK.options());
        kernel<<<dim3(n_tokens, blocks), threads, 0, stream>>>(
            grad_y_TD.const_data_ptr<scalar_t>(), y_SD.const_data_ptr<scalar_t>(),
            row_map_TK.const_data_ptr<int32_t>(), weights_TK.const_data_ptr<acc_t>(),
            grad_y_SD.mutable_data_ptr<scalar_t>(), partial_TKB.mutable_data_ptr<acc_t>(),
            ok.mutable_data_ptr<int32_t>(), y_SD.size(0), dim, top_k);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        grad_weights_TK = blocks == 1 ? partial_TKB.view({n_tokens, top_k}) : partial_TKB.sum(2);
      };
      if (aligned) {
        launch(unpermute_backward_kernel<scalar_t, vec>, 128, vec);
      } else {
        launch(unpermute_backward_kernel<scalar_t, 1>, 256, 1);
      }
    }
  });
  at::_assert_async(ok, "unpermute_backward: row_map_TK values must be in [0, S)");
  return {grad_y_SD, grad_weights_TK.to(weights_TK_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsv3, CUDA, m) {
  m.impl("expert_index", &expert_index_cuda);
  m.impl("permute_rows", &permute_rows_cuda);
  m.impl("unpermute", &unpermute_cuda);
  m.impl("unpermute_backward", &unpermute_backward_cuda);
}

}  // namespace dsv3
