"""dsv3.kernels.scratch: Triton's allocator is ours around our launches on a GPU only,
a user's own is kept, and whatever was set before comes back after (also on error)."""
import pytest
import torch

pytest.importorskip("triton")
from triton.runtime import _allocation  # noqa: E402

from dsv3.kernels.scratch import triton_scratch  # noqa: E402


@pytest.fixture(autouse=True)
def no_allocator():
    """Triton's default, none, whatever else in this process set one."""
    token = _allocation._allocator.set(_allocation.NullAllocator())
    yield
    _allocation._allocator.reset(token)


def test_set_for_gpu_launches_and_reset_after():
    assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    with triton_scratch(torch.device("cuda", 0)):
        assert not isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    with pytest.raises(KeyError), triton_scratch(torch.device("cuda", 0)):
        raise KeyError("a failed launch")
    assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)


def test_left_alone_off_the_gpu_and_where_the_user_set_one():
    with triton_scratch(torch.device("cpu")):
        assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)

    def users(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    token = _allocation._allocator.set(users)
    try:
        with triton_scratch(torch.device("cuda", 0)):
            assert _allocation._allocator.get() is users
        assert _allocation._allocator.get() is users
    finally:
        _allocation._allocator.reset(token)


@pytest.mark.gpu
def test_scratch_is_device_memory_of_the_asked_size():
    with triton_scratch(torch.device("cuda", 0)):
        buffer = _allocation._allocator.get()(384, 128, None)
    assert buffer.device.type == "cuda" and buffer.numel() == 384
    assert buffer.data_ptr() % 128 == 0
