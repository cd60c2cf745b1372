// Multiversioned bf16 <-> float row conversions (see vec_math.h for why).
#include "vec_math.h"

namespace dsv3::vec {

DSV3_MULTIVERSION void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(src[i].x) << 16;
    std::memcpy(dst + i, &bits, sizeof(float));
  }
}

// Overflow goes to inf. A NaN keeps its sign and top payload bits, with the quiet bit
// set: the rounding increment would carry a NaN whose low bits are all set (0x7fffffff,
// CUDA's canonical NaN) into the sign bit, and give -0.0. A select, so it vectorizes.
DSV3_MULTIVERSION void from_float(const float* src, c10::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, src + i, sizeof(bits));
    const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    dst[i].x = static_cast<uint16_t>(nan ? (bits >> 16) | 0x40u : rounded);
  }
}

}  // namespace dsv3::vec

namespace dsv3::vec {

DSV3_MULTIVERSION void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

DSV3_MULTIVERSION void scale(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = alpha * x[i];
}

DSV3_MULTIVERSION float dot(const float* x, const float* y, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i] * y[i];
  return sum;
}

}  // namespace dsv3::vec
