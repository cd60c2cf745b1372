"""torch.compile(fullgraph=True) runs the layer through the dsv3 ops with no graph
break, forward and backward, with dynamic token counts, and matches eager."""
import pytest
import torch

import dsv3


@pytest.mark.parametrize("overrides", [
    {"aux_loss_coef": 0.01},  # Mixtral-style softmax router with the load-balance loss
    {"score": "sigmoid", "n_groups": 2, "topk_groups": 1, "route_scale": 2.5,
     "bias_update_rate": 1e-3, "n_shared_experts": 1, "aux_loss_coef": 1e-3,
     "z_loss_coef": 1e-3},  # DeepSeek-V3 router, every auxiliary term on
], ids=["softmax_aux", "deepseek_all_terms"])
def test_compiled_layer_matches_eager(overrides):
    torch._dynamo.reset()
    config = dsv3.MoEConfig(dim=32, ffn_dim=48, n_experts=6, top_k=2, **overrides)
    moe = dsv3.MoE(config)
    compiled = torch.compile(moe, fullgraph=True, dynamic=True)
    for n_tokens in (10, 17):  # a second size must reuse the dynamic graph, not break
        x_TD = torch.randn(n_tokens, 32, requires_grad=True)
        y_TD = compiled(x_TD)
        (y_TD.square().sum() + dsv3.moe_aux_loss(moe)).backward()
        compiled_grads = [x_TD.grad.clone(), moe.gate_up_proj.grad.clone(),
                          moe.router.weight.grad.clone()]
        x_TD.grad = None
        moe.zero_grad(set_to_none=True)

        eager_y_TD = moe(x_TD)
        (eager_y_TD.square().sum() + dsv3.moe_aux_loss(moe)).backward()
        torch.testing.assert_close(y_TD, eager_y_TD)
        for got, want in zip(compiled_grads, [x_TD.grad, moe.gate_up_proj.grad,
                                              moe.router.weight.grad]):
            torch.testing.assert_close(got, want)
        x_TD.grad = None
        moe.zero_grad(set_to_none=True)


def test_compiled_gather_still_rejects_a_row_map_with_repeats():
    """The ops' input checks on values are graph ops under torch.compile (an assert,
    not a Python branch), so a compiled call still rejects bad values, without a break."""
    gather = torch.compile(dsv3.ops.gather_grouped_mm, fullgraph=True)
    x_TX, w_EXY = torch.randn(2, 4), torch.randn(2, 4, 3)
    offsets_E = torch.tensor([1, 3], dtype=torch.int32)
    good = gather(x_TX, w_EXY, offsets_E, torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))
    assert good.shape == (4, 3)
    with pytest.raises(RuntimeError, match="row_map_TK"):
        gather(x_TX, w_EXY, offsets_E, torch.tensor([[0, 1], [1, 2]], dtype=torch.int32))
