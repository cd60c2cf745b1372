"""Global memory for Triton kernels that build TMA descriptors on the device (the
flattened wgrad builds one per tile: grouped_gemm_kernels._wgrad_uniform_walk).
Triton asks its allocator for that memory at each launch and has none by default;
setting one for the whole process (triton.set_allocator) would replace a user's own,
so the launcher sets ours around its own launches only, and keeps a user's where one
is set. The allocator is a ContextVar (triton.runtime._allocation, Triton 3.6 to 3.8),
which set/reset scope to this thread's launch."""
import contextlib

import torch
from triton.runtime import _allocation


@contextlib.contextmanager
def triton_scratch(device: torch.device):
    """Triton's allocator, inside the block, as torch's caching allocator on ``device``
    (on its current stream, the launch's), unless one is already set. Off a GPU (the
    interpreter) no kernel asks for it."""
    allocator = _allocation._allocator
    if device.type != "cuda" or not isinstance(allocator.get(), _allocation.NullAllocator):
        yield
        return

    def scratch(size: int, alignment: int, stream) -> torch.Tensor:
        # The caching allocator's blocks are 512-byte aligned, more than Triton asks
        # (128 for a tensormap).
        return torch.empty(size, dtype=torch.int8, device=device)

    token = allocator.set(scratch)
    try:
        yield
    finally:
        allocator.reset(token)
