"""The README's layer examples run as written: they are read out of README.md here, so
a renamed argument or attribute fails this test rather than a reader's first try.
(The distributed and transformers examples need process groups or a hub model and are
covered by their own tests.)"""
import re
from pathlib import Path

import torch

import dsv3

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _block_with(text: str) -> str:
    blocks = [block for block in _python_blocks() if text in block]
    assert len(blocks) == 1, f"README: {len(blocks)} python blocks hold {text!r}"
    return blocks[0]


def test_the_first_layer_example_runs_as_written():
    scope: dict = {}
    exec(compile(_block_with("moe.last_stats"), "README.md", "exec"), scope)
    moe, x, y = scope["moe"], scope["x"], scope["y"]
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert all(p.grad is not None for p in moe.parameters())
    assert int(moe.last_stats.tokens_per_expert.sum()) == x.shape[0] * x.shape[1] * 2


def test_the_deepseek_v3_routing_example_runs_with_a_training_step():
    """Its `...` stands for a training step: given one, the layer routes with the shown
    config and moe_update_bias moves the selection bias."""
    torch.manual_seed(0)
    block = _block_with("moe_update_bias")
    layer_part, step_part = block.split("...")
    scope: dict = {"dsv3": dsv3, "torch": torch}
    exec(compile(layer_part, "README.md", "exec"), scope)
    moe = scope["moe"]
    optimizer = torch.optim.SGD(moe.parameters(), lr=1e-3)
    moe(torch.randn(64, moe.config.dim)).square().mean().backward()
    bias_before = moe.expert_bias.clone()
    scope.update(model=moe, optimizer=optimizer)
    exec(compile(step_part, "README.md", "exec"), scope)
    assert not torch.equal(moe.expert_bias, bias_before)
