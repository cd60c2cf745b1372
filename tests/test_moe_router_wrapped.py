"""A router wrapped by an adapter or a hook takes part in dsv3.MoE's forward: the layer
read router.weight directly, so a PEFT LoRA on it changed nothing and got no gradient,
and forward hooks on it never fired."""
import pytest
import torch

import dsv3


def _layer():
    torch.manual_seed(0)
    return dsv3.MoE(dsv3.MoEConfig(dim=16, ffn_dim=8, n_experts=4, top_k=2))


def test_a_forward_hook_on_the_router_fires_and_changes_the_routing():
    moe = _layer()
    x = torch.randn(10, 16)
    plain = moe(x)
    calls = []
    moe.router.register_forward_hook(lambda mod, args, out: calls.append(1) or -out)
    flipped = moe(x)
    assert calls == [1]
    assert not torch.allclose(plain, flipped)


def test_a_lora_adapter_on_the_router_changes_the_output_and_trains():
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = _layer()

        def forward(self, x):
            return self.moe(x)
    model = peft.get_peft_model(Net(), peft.LoraConfig(target_modules=["router"], r=4,
                                                      init_lora_weights=False))
    x = torch.randn(10, 16)
    y = model(x)
    with model.disable_adapter():
        y0 = model(x)
    assert not torch.allclose(y, y0)
    y.square().sum().backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
