// bf16 and fp16 GEMMs on CPUs that have no native matmul for them. There at::mm
// falls back to a generic loop: measured on a 2-core AVX2 EPYC (no AVX512), a
// 146 x 512 x 512 bf16 at::mm took 59 ms against 0.63 ms in fp32, and converting
// the operands to fp32 and the result back took 1.6-3.6 ms in all. Where oneDNN
// reports native support (AVX512 / AVX512-BF16 / AMX for bf16, AVX512-FP16 / AMX-FP16
// for fp16, as torch routes at::mm), at::mm keeps the half-precision operands.
//
// DSV3_CPU_HALF_GEMM overrides the choice: "auto" (default, as above), "fp32" (always
// convert) or "native" (never), so the tests check both paths on any machine.
#pragma once

#include <ATen/ATen.h>

namespace dsv3 {

// True when a CPU GEMM on ``dtype`` operands runs through fp32 copies (see above);
// false for fp32/fp64. Throws on an unknown DSV3_CPU_HALF_GEMM, naming it.
bool half_gemm_in_fp32(at::ScalarType dtype);

// out = a @ b on CPU tensors of out's dtype; with ``in_fp32`` (half_gemm_in_fp32 of
// that dtype, asked once by the caller) a and b are converted to fp32, multiplied
// with fp32 accumulation as the native path does, and the result rounded into out.
void cpu_mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool in_fp32);

}  // namespace dsv3
