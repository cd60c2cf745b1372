// SwiGLU on the CPU, fused: one vectorized pass reads gate and up from the
// grouped GEMM's [S, 2F] output and writes silu(gate) * up. The backward
// recomputes the sigmoid instead of saving silu(gate), so the layer keeps one
// [S, 2F] activation for backward rather than an extra [S, F].
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

namespace dsv3 {
namespace {

constexpr int64_t kRowGrain = 16;

void check_hidden(const at::Tensor& h_S2F, const char* op) {
  TORCH_CHECK_VALUE(h_S2F.dim() == 2 && h_S2F.size(1) % 2 == 0, op,
                    ": h_S2F must be 2-D [S, 2F] with an even last dim, got ", h_S2F.sizes());
}

at::Tensor swiglu_cpu(const at::Tensor& h_S2F_in) {
  check_hidden(h_S2F_in, "swiglu");
  const at::Tensor h_S2F = h_S2F_in.contiguous();
  const int64_t n_rows = h_S2F.size(0), ffn = h_S2F.size(1) / 2;
  at::Tensor a_SF = at::empty({n_rows, ffn}, h_S2F.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_S2F.scalar_type(), "swiglu", [&] {
    const scalar_t* h = h_S2F.const_data_ptr<scalar_t>();
    scalar_t* a = a_SF.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n_rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        const scalar_t* gate = h + s * 2 * ffn;
        at::vec::map2(
            [](auto g, auto u) {
              using Vec = decltype(g);
              return g * u / (Vec(1) + g.neg().exp());
            },
            a + s * ffn, gate, gate + ffn, ffn);
      }
    });
  });
  return a_SF;
}

// With sig = sigmoid(g): d(up) = grad * g * sig; d(gate) = grad * up * sig * (1 + g * (1 - sig)).
at::Tensor swiglu_backward_cpu(const at::Tensor& grad_a_SF_in, const at::Tensor& h_S2F_in) {
  check_hidden(h_S2F_in, "swiglu_backward");
  const at::Tensor h_S2F = h_S2F_in.contiguous();
  const at::Tensor grad_a_SF = grad_a_SF_in.to(h_S2F.scalar_type()).contiguous();
  const int64_t n_rows = h_S2F.size(0), ffn = h_S2F.size(1) / 2;
  at::Tensor grad_h_S2F = at::empty_like(h_S2F);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_S2F.scalar_type(),
                                  "swiglu_backward", [&] {
    const scalar_t* h = h_S2F.const_data_ptr<scalar_t>();
    const scalar_t* grad = grad_a_SF.const_data_ptr<scalar_t>();
    scalar_t* grad_h = grad_h_S2F.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n_rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        const scalar_t* gate = h + s * 2 * ffn;
        const scalar_t* grad_row = grad + s * ffn;
        scalar_t* grad_gate = grad_h + s * 2 * ffn;
        at::vec::map3(
            [](auto dy, auto g, auto u) {
              using Vec = decltype(g);
              const Vec one(1);
              const Vec sig = one / (one + g.neg().exp());
              return dy * u * sig * (one + g * (one - sig));
            },
            grad_gate, grad_row, gate, gate + ffn, ffn);
        at::vec::map2(
            [](auto dy, auto g) {
              using Vec = decltype(g);
              return dy * g / (Vec(1) + g.neg().exp());
            },
            grad_gate + ffn, grad_row, gate, ffn);
      }
    });
  });
  return grad_h_S2F;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsv3, CPU, m) {
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
}

}  // namespace dsv3
