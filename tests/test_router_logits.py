"""The router's logits (dsv3.ops.linear.py): computed in fp32 whatever the
layer's dtype, their gradients in the layer's (bf16/fp16) dtype (through fp32 on a CPU
without native half GEMMs), and no fp32 copy of the layer's input kept for the backward."""
import pytest
import torch
import torch.nn.functional as F

import dsv3
from dsv3.ops.linear import router_logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_full_precision_layer_gets_f_linears_values_and_gradients(dtype):
    x = torch.randn(33, 40, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 40, dtype=dtype, requires_grad=True)
    g = torch.randn(33, 6, dtype=dtype)
    got = router_logits(x, w, dtype)
    want = F.linear(x, w)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(got, (x, w), g),
                                                 torch.autograd.grad(want, (x, w), g)))


@pytest.mark.parametrize("half_gemm", ["native", "fp32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_layer_routes_in_fp32_and_backpropagates_in_its_dtype(
        dtype, half_gemm, monkeypatch):
    """The backward's GEMMs in the layer's dtype; on a CPU without native half GEMMs
    (DSV3_CPU_HALF_GEMM=fp32 forces it) in fp32, rounded to the layer's dtype."""
    monkeypatch.setenv("DSV3_CPU_HALF_GEMM", half_gemm)
    x = torch.randn(64, 48).to(dtype).requires_grad_()
    w = torch.randn(8, 48).to(dtype).requires_grad_()
    g = torch.randn(64, 8)
    logits = router_logits(x, w, torch.float32)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, F.linear(x.float(), w.float()))  # the choices: exact
    grad_x, grad_w = torch.autograd.grad(logits, (x, w), g)
    assert grad_x.dtype == grad_w.dtype == dtype
    # what it promises: the layer's-dtype GEMMs of the rounded gradient, or fp32 ones...
    if half_gemm == "native":
        assert torch.equal(grad_x, g.to(dtype) @ w)
        assert torch.equal(grad_w, g.to(dtype).t() @ x)
    else:
        assert torch.equal(grad_x, (g @ w.float()).to(dtype))
        assert torch.equal(grad_w, (g.t() @ x.float()).to(dtype))
    # ...within a rounding of the exact gradients
    exact_x, exact_w = g.double() @ w.double(), g.double().t() @ x.double()
    for got, exact in ((grad_x, exact_x), (grad_w, exact_w)):
        assert (got.double() - exact).abs().max() <= 0.02 * exact.abs().max()


def test_an_fp32_master_weight_under_autocast_gets_an_fp32_gradient():
    x = torch.randn(16, 32).bfloat16().requires_grad_()
    w = torch.randn(4, 32, requires_grad=True)  # fp32 master, as under autocast
    grad_x, grad_w = torch.autograd.grad(router_logits(x, w, torch.float32).sum(), (x, w))
    assert grad_x.dtype == torch.bfloat16 and grad_w.dtype == torch.float32


def test_a_bf16_layer_keeps_no_fp32_copy_of_its_input():
    """F.linear(x.float(), ...) kept x's fp32 copy for the weight's gradient: 4 bytes
    per token and model dimension in every MoE layer."""
    moe = dsv3.MoE(dsv3.MoEConfig(dim=64, ffn_dim=32, n_experts=4, top_k=2),
                   dtype=torch.bfloat16)
    x_TD = torch.randn(50, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append((tensor.dtype, tuple(tensor.shape)))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y_TD = moe(x_TD)
    assert (torch.float32, (50, 64)) not in saved
    y_TD.sum().backward()
    assert moe.router.weight.grad.dtype == torch.bfloat16
