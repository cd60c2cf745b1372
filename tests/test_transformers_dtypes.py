"""A patched block's and experts_implementation="dsv3"'s dtypes and input errors, as the
HF modules they replace have them: under autocast the output takes the input's dtype
and the experts compute in the autocast dtype (as transformers' experts loop casts),
and bad input is refused naming the HF argument, hidden_states."""
import functools

import pytest
import torch

pytest.importorskip("transformers")  # only where it is not installed; CI has it

from hf_models import sparse_block, tiny_model
from transformers_support import DsvOpLog, arch_param

import dsv3.integrations.transformers as dt


@pytest.mark.parametrize("arch", [arch_param(a) for a in ("mixtral", "qwen2_moe", "deepseek_v3")])
def test_under_autocast_a_patched_block_returns_the_hf_blocks_dtype(arch):
    """Before: the patched block returned dsv3.MoE's autocast dtype (bf16) where the HF
    block returns its input's (fp32)."""
    model = tiny_model(arch)
    block = sparse_block(model)
    x = torch.randn(2, 5, model.config.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = block(x)
        patched = dt.from_module(block)
        got = patched(x)
    want = want[0] if isinstance(want, tuple) else want
    assert got.dtype == want.dtype == torch.float32
    # both in bf16 arithmetic, in their own order
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


def test_a_patched_block_names_hidden_states_in_its_errors():
    """The HF block's argument is hidden_states: the errors named dsv3.MoE's x."""
    model = tiny_model("mixtral")
    dt.patch_moe(model)
    block, dim = sparse_block(model), model.config.hidden_size
    with pytest.raises(ValueError, match=rf"TransformersMoE: hidden_states must have shape "
                                         rf"\[\.\.\., dim={dim}\], got \(2, 5, {dim + 1}\)"):
        block(torch.randn(2, 5, dim + 1))
    with pytest.raises(TypeError, match=r"TransformersMoE: hidden_states must have the layer's "
                                        r"dtype torch.float32, got torch.float64"):
        block(torch.randn(2, 5, dim, dtype=torch.float64))


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16])
def test_dsv3_experts_under_autocast_run_as_the_hf_loop(arch, weights_dtype):
    """experts_implementation="dsv3" under CPU autocast: the operands are cast as the HF
    loop's F.linear casts them, and the output takes the input's dtype. Before: fp32
    activations met bf16 weights in the grouped GEMM and were refused there (TypeError),
    and fp32 weights ran in fp32."""
    from test_transformers_gpt_oss import tiny_gpt_oss
    build = tiny_gpt_oss if arch == "gpt_oss" else functools.partial(tiny_model, arch)
    hf_model, model = (build(experts_implementation=name).to(weights_dtype)
                       for name in ("eager", "dsv3"))
    hf_experts, experts = sparse_block(hf_model).experts, sparse_block(model).experts
    n_tokens, top_k = 7, 2
    torch.manual_seed(1)
    x_TD = torch.randn(n_tokens, model.config.hidden_size)  # fp32, whatever the weights
    experts_TK = torch.stack([torch.randperm(hf_experts.num_experts)[:top_k]
                              for _ in range(n_tokens)])
    weights_TK = torch.rand(n_tokens, top_k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = hf_experts(x_TD, experts_TK, weights_TK)
        with DsvOpLog() as log:
            got = experts(x_TD, experts_TK, weights_TK)
    assert "grouped_mm" in log.ops
    assert got.dtype == want.dtype == torch.float32
    # both in bf16 arithmetic, in their own order
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
