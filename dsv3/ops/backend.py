"""Chooses which implementation an op call runs, in one place for every op.

``DSV3_BACKEND`` selects it: ``auto`` (default) runs the compiled kernels where the
tensors' device has them and the reference path elsewhere; ``reference`` forces
the plain-PyTorch reference path everywhere (for debugging a kernel against the
truth without changing any call site).
"""
import os

import torch

BACKENDS = ("auto", "reference")

# Devices with compiled dsv3 kernels. GPU kernels arrive with the GPU issue; until
# then CUDA tensors take the reference path, which is plain PyTorch and runs there.
_KERNEL_DEVICES = ("cpu",)


def selected_backend() -> str:
    name = os.environ.get("DSV3_BACKEND", "auto").lower()
    if name not in BACKENDS:
        raise ValueError(f"DSV3_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def use_reference(tensor: torch.Tensor) -> bool:
    """True when calls on ``tensor`` must take the reference path."""
    return selected_backend() == "reference" or tensor.device.type not in _KERNEL_DEVICES
