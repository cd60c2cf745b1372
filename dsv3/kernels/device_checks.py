"""Raising on input values that only a kernel reads (routing offsets, row maps, NaN
logits) without a host sync. The kernels write a one-element "input was good" flag
as they go; on the CPU (the interpreter) reading it is free, so the launcher raises
the same ValueError as the C++ kernel, and on a GPU a device-side assert (like
PyTorch's own indexing) reports it at the next sync, so the launch stays async and
capturable in a CUDA graph. The kernels also keep every access in bounds whatever
the values, so a bad input can never read or write outside its tensors first."""
import torch


def good_flags(device: torch.device, count: int = 1) -> torch.Tensor:
    """``count`` "input was good" flags, set: for kernels whose programs clear them on
    bad input (a flag with a single writer needs no initial value, nor this launch)."""
    return torch.ones(count, device=device, dtype=torch.int32)


def raise_unless(ok: torch.Tensor, message: str) -> None:
    """``ok``: one-element tensor, nonzero when the input was good. Under torch.compile
    (the ops' Python wrappers are traced) it is an assert op in the graph on every
    device: branching on a tensor's value would break the graph."""
    if torch.compiler.is_compiling() or ok.device.type != "cpu":
        torch._assert_async(ok.reshape(()), message)
    elif not bool(ok.reshape(-1)[0]):
        raise ValueError(message)
