"""The GPU path of the whole layer makes no host syncs: a dropless MoE forward and
backward can be captured in a CUDA graph and replayed with the same results."""
import pytest
import torch

import dsv3


@pytest.mark.gpu
@pytest.mark.parametrize("overrides", [
    {},  # softmax top-2 (Mixtral)
    {"score": "sigmoid", "n_groups": 4, "topk_groups": 2, "route_scale": 2.5,
     "bias_update_rate": 1e-3, "n_shared_experts": 1},  # DeepSeek-V3 router
])
def test_layer_forward_backward_captures_in_a_cuda_graph(overrides):
    config = dsv3.MoEConfig(dim=256, ffn_dim=128, n_experts=16, top_k=4, **overrides)
    moe = dsv3.MoE(config, device="cuda", dtype=torch.bfloat16)
    x_TD = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        y_TD = moe(x_TD)
        (y_TD.float().square().mean() + dsv3.moe_aux_loss(moe)).backward()
        return y_TD

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up: autotuning and lazy init happen outside capture
            eager_y = step()
    torch.cuda.current_stream().wait_stream(stream)
    eager_grad = moe.gate_up_proj.grad.clone()

    graph = torch.cuda.CUDAGraph()
    moe.zero_grad(set_to_none=False)
    x_TD.grad.zero_()
    with torch.cuda.graph(graph):
        graph_y = step()
    moe.zero_grad(set_to_none=False)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(graph_y, eager_y)
    torch.testing.assert_close(moe.gate_up_proj.grad, eager_grad / 2, rtol=1e-2, atol=1e-3)
