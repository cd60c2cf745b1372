"""torch.compile(fullgraph=True) of what the transformers integration runs: a patched
block (fused routing, shared experts, correction bias) and an HF experts module under
experts_implementation="dsv3". No graph break, dynamic token counts, forward and
backward equal to eager."""
import pytest
import torch

pytest.importorskip("transformers")  # only where it is not installed; CI has it

from conftest import assert_close
from hf_models import input_ids, missing, tiny_model

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


def test_compiled_patched_block():
    """DeepSeek-V3's block: group-limited sigmoid routing with the correction bias and
    shared experts (Qwen2-MoE's gated shared expert: the whole-model test below)."""
    moe = dt.from_module(tiny_model("deepseek_v3").model.layers[1].mlp)
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


def test_compiled_patched_model_with_router_logits():
    """The whole patched model under fullgraph with dynamic sequence lengths, the
    router_logits hooks on the logits tap included (installed by an eager call first:
    transformers' lazy hook installation takes a lock that dynamo cannot trace,
    patched model or not); loss, logits, aux loss and every gradient match eager."""
    torch._dynamo.reset()
    model = tiny_model("qwen2_moe", num_hidden_layers=1)  # one layer: half the compile time
    dt.patch_moe(model)
    model(input_ids(), output_router_logits=True)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)

    def run(fn, ids):
        model.zero_grad(set_to_none=True)
        out = fn(ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        return out, [p.grad.clone() for p in model.parameters()]

    for i, seq in enumerate((9, 13)):
        ids = input_ids(seq=seq)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got, got_grads = run(compiled, ids)
        want, want_grads = run(model, ids)
        assert_close(got.logits, want.logits, f"logits (seq {seq})")
        assert_close(got.aux_loss, want.aux_loss, f"aux_loss (seq {seq})")
        assert len(got.router_logits) == 1
        for j, (g, w) in enumerate(zip(got_grads, want_grads, strict=True)):
            assert_close(g, w, f"grad {j} (seq {seq})")


@pytest.mark.skipif(missing("glm5_next") is not None, reason=str(missing("glm5_next")))
def test_compiled_clamped_swiglu_experts():
    """GLM-5-Next's clamped-SwiGLU experts: recognising their class (which reads the
    class's _apply_gate, whose __qualname__ dynamo does not trace faithfully) must not
    refuse them under torch.compile."""
    model = tiny_model("glm5_next", experts_implementation="dsv3")
    experts = next(m for m in model.modules() if type(m).__name__ == "Glm5NextTextExperts")
    n_experts = experts.gate_up_proj.shape[0]

    def make_inputs(n_tokens):
        gen = torch.Generator().manual_seed(n_tokens)
        top_k_index = torch.rand(n_tokens, n_experts, generator=gen).argsort(1)[:, :2]
        top_k_weights = torch.rand(n_tokens, 2, generator=gen).requires_grad_()
        return torch.randn(n_tokens, 32, requires_grad=True), top_k_index, top_k_weights

    _compare_compiled(experts, make_inputs, lambda inputs: [inputs[0], inputs[2],
                                                            experts.gate_up_proj,
                                                            experts.down_proj])


@pytest.mark.skipif(missing("glm5_next") is not None, reason=str(missing("glm5_next")))
def test_compiled_clamped_experts_follow_a_changed_limit():
    """Only the class check is a constant of the graph: the limit is read live, so a
    limit changed after compiling recompiles rather than being ignored."""
    torch._dynamo.reset()
    model = tiny_model("glm5_next", experts_implementation="dsv3")
    experts = next(m for m in model.modules() if type(m).__name__ == "Glm5NextTextExperts")
    gen = torch.Generator().manual_seed(3)
    top_k_index = torch.rand(12, experts.gate_up_proj.shape[0], generator=gen).argsort(1)[:, :2]
    inputs = (3 * torch.randn(12, 32, generator=gen), top_k_index, torch.rand(12, 2, generator=gen))
    compiled = torch.compile(experts, fullgraph=True)
    compiled(*inputs)
    experts.swiglu_limit = 0.25
    assert_close(compiled(*inputs), experts(*inputs), "compiled output after the limit changed")


def test_experts_with_an_instance_gate_are_refused():
    experts = tiny_model("qwen3_moe", experts_implementation="dsv3").model.layers[0].mlp.experts
    experts._apply_gate = lambda gate_up: gate_up[..., :gate_up.shape[-1] // 2]
    with pytest.raises(NotImplementedError, match="replaced on the instance"):
        experts(torch.randn(3, 32), torch.zeros(3, 2, dtype=torch.int64), torch.ones(3, 2))
