"""Chooses which implementation an op call runs, in one place for every op.

``DSV3_BACKEND`` selects it:
- ``auto`` (default): the dispatcher routes by device: CPU tensors to the C++
  kernels, CUDA tensors to the Triton kernels (when triton is installed);
- ``triton``: the Triton kernels whatever the device (CPU tensors need
  ``TRITON_INTERPRET=1``); ops without a Triton kernel keep their CPU kernel;
- ``reference``: the plain-PyTorch reference path everywhere, to debug a kernel
  against the truth without changing any call site.
Devices without kernels (or CUDA without triton) take the reference path.
"""
import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "triton")


def selected_backend() -> str:
    name = os.environ.get("DSV3_BACKEND", "auto").lower()
    if name not in BACKENDS:
        raise ValueError(f"DSV3_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_reference(tensor: torch.Tensor) -> bool:
    """True when calls on ``tensor`` must take the reference path."""
    if selected_backend() == "reference":
        return True
    if tensor.device.type == "cuda":
        return not triton_available()
    return tensor.device.type != "cpu"
