// Elementwise helpers for the CPU kernels, written so GCC auto-vectorizes them.
//
// Why not ATen's at::vec::Vectorized: its fast paths exist only when a file is
// compiled per ISA with CPU_CAPABILITY set (ATen's DispatchStub machinery); an
// extension built with plain flags gets the scalar fallback (~10x slower here).
// Instead, hot loops are plain float loops compiled in several ISA versions by
// DSV3_MULTIVERSION (GCC target_clones: the loader picks AVX-512, AVX2 or the
// x86-64 baseline at run time), and exp is a polynomial that vectorizes.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DSV3_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DSV3_MULTIVERSION
#endif

namespace dsv3::vec {

// Its clamp is a compare-and-select: loops calling it vectorize for AVX2 and the
// baseline only because setup.py builds with -fno-trapping-math.
//
// exp(x) for float: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then a
// degree-6 Taylor polynomial of e^r (relative error < 2e-7); 2^n is built in the
// exponent bits. Inputs are clamped to [-87, 88] so 2^n stays a normal float.
constexpr float kFastExpLowest = -87.0f;  // below it fast_exp answers exp(-87)

inline float fast_exp(float x) {
  x = x < kFastExpLowest ? kFastExpLowest : (x > 88.0f ? 88.0f : x);
  // Adding and removing 1.5 * 2^23 rounds to the nearest integer in any vector ISA.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// 0 below -88, where exp(-x) passes float's range, as torch's sigmoid gives (it has
// denormals down to -103.9, below 1e-38): fast_exp's clamp alone left 6e-39 there, so
// silu(-1e37) came out -0.06 and silu(-inf) -inf where torch gives -0 and NaN. A
// select, so the loops still vectorize; NaN stays NaN.
inline float fast_sigmoid(float x) {
  const float s = 1.0f / (1.0f + fast_exp(-x));
  return x < -88.0f ? 0.0f : s;
}

// Rows of reduced-precision values are widened to float chunks for the math.
inline void to_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void from_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

void to_float(const c10::BFloat16* src, float* dst, int64_t n);
void from_float(const float* src, c10::BFloat16* dst, int64_t n);  // round to nearest even

inline void to_float(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
inline void from_float(const float* src, c10::Half* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

}  // namespace dsv3::vec

namespace dsv3::vec {

void axpy(float alpha, const float* x, float* y, int64_t n);  // y += alpha * x
void scale(float alpha, const float* x, float* y, int64_t n);  // y = alpha * x
float dot(const float* x, const float* y, int64_t n);  // fixed order per build: deterministic

// Loads n values of any supported dtype as float: returns src itself for float
// input, else widens into buffer.
template <typename scalar_t>
const float* as_float(const scalar_t* src, float* buffer, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    to_float(src, buffer, n);
    return buffer;
  }
}

}  // namespace dsv3::vec
