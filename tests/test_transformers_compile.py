"""torch.compile(fullgraph=True) of what the transformers integration runs: a patched
block (fused routing, shared experts, correction bias) and an HF experts module under
experts_implementation="dsv3". No graph break, dynamic token counts, forward and
backward equal to eager."""
import pytest
import torch

from conftest import assert_close
from hf_models import tiny_model

import dsv3.integrations.transformers as dt

TOKEN_COUNTS = (10, 17)  # the second must reuse the dynamic graph (fullgraph: no break)


def _step(module, inputs, leaves):
    """Output and the grads of ``leaves`` for a fixed upstream gradient."""
    out = module(*inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads


def _compare_compiled(module, make_inputs, leaves_of):
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    for i, n_tokens in enumerate(TOKEN_COUNTS):
        inputs = make_inputs(n_tokens)
        leaves = leaves_of(inputs)
        # After the first size, a recompile (a shape-specialized graph) is a failure.
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got, got_grads = _step(compiled, inputs, leaves)
        want, want_grads = _step(module, inputs, leaves)
        assert_close(got, want, f"compiled output (T={n_tokens})")
        for i, (g, w) in enumerate(zip(got_grads, want_grads, strict=True)):
            assert_close(g, w, f"compiled grad {i} (T={n_tokens})")


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])  # gated shared; groups + bias
def test_compiled_patched_block(arch):
    moe = dt.from_module(tiny_model(arch).model.layers[1].mlp)
    params = [moe.router.weight, moe.gate_up_proj, moe.down_proj,
              *[p for name, p in moe.named_parameters() if name.startswith("shared")]]

    def make_inputs(n_tokens):
        return (torch.randn(1, n_tokens, 32, requires_grad=True),)

    _compare_compiled(moe, make_inputs, lambda inputs: [inputs[0], *params])


def test_compiled_experts_implementation():
    experts = tiny_model("qwen3_moe", experts_implementation="dsv3").model.layers[0].mlp.experts
    assert experts.config._experts_implementation == "dsv3"

    def make_inputs(n_tokens):
        gen = torch.Generator().manual_seed(n_tokens)
        top_k_index = torch.rand(n_tokens, 6, generator=gen).argsort(1)[:, :2]  # int64, as HF
        top_k_weights = torch.rand(n_tokens, 2, generator=gen).requires_grad_()
        return torch.randn(n_tokens, 32, requires_grad=True), top_k_index, top_k_weights

    _compare_compiled(experts, make_inputs,
                      lambda inputs: [inputs[0], inputs[2], experts.gate_up_proj, experts.down_proj])
