// See half_gemm.h for why a CPU bf16/fp16 GEMM may run through fp32 copies.
#include "half_gemm.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

namespace dsv3 {
namespace {

// torch's own answer to "would at::mm take oneDNN's native kernel for this dtype"
// (the mkldnn:: query ops, as torch.ops.mkldnn._is_mkldnn_bf16_supported()). A torch
// without the op is taken to have the native path, which at::mm then uses anyway.
bool ask_torch(const char* op_name) {
  const auto handle = c10::Dispatcher::singleton().findSchema({op_name, ""});
  if (!handle.has_value()) return true;
  return handle->typed<bool()>().call();
}

bool native_half_gemm(at::ScalarType dtype) {
  static const bool bf16 = ask_torch("mkldnn::_is_mkldnn_bf16_supported");
  static const bool fp16 = ask_torch("mkldnn::_is_mkldnn_fp16_supported");
  return dtype == at::kBFloat16 ? bf16 : fp16;
}

}  // namespace

bool half_gemm_in_fp32(at::ScalarType dtype) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  // Read on every call (a getenv, against a GEMM) so that a test can switch it.
  const char* text = std::getenv("DSV3_CPU_HALF_GEMM");
  const std::string mode = text == nullptr || *text == '\0' ? "auto" : text;
  if (mode == "fp32") return true;
  if (mode == "native") return false;
  TORCH_CHECK_VALUE(mode == "auto", "DSV3_CPU_HALF_GEMM must be auto, fp32 or native, got '",
                    mode, "'");
  return !native_half_gemm(dtype);
}

void cpu_mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool in_fp32) {
  // A custom op's kernel still sees the caller's autocast (this thread's, not the
  // OpenMP workers'): it cast the fp32 copies back to bf16 (slow, and fp16 operands
  // under a bf16 autocast lost precision). The dtypes are chosen here.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  if (!in_fp32) {
    at::mm_out(out, a, b);
    return;
  }
  // .to() keeps a transposed view's strides: at::mm reads it transposed, no copy.
  out.copy_(at::mm(a.to(at::kFloat), b.to(at::kFloat)));
}

namespace {
bool half_gemm_in_fp32_op(at::ScalarType dtype) { return half_gemm_in_fp32(dtype); }
}  // namespace

// The same choice for the Python-side GEMMs on the CPU (the router's backward).
TORCH_LIBRARY_FRAGMENT(dsv3, m) {
  m.def("cpu_half_gemm_in_fp32(ScalarType dtype) -> bool", &half_gemm_in_fp32_op);
}

}  // namespace dsv3
