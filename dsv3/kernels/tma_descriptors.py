"""TMA (Hopper tensor memory accelerator) descriptors for the grouped GEMMs' loads:
which operands TMA can read (16-bit, 16-byte aligned, last dim contiguous, on sm_90+)
and their descriptors, built once per call with a dummy block shape that each
autotune config's pre-launch hook replaces (config.tma_block_shapes). Kept apart from
the kernels: it is host code, and its rules decide which variants the tuner weighs."""
import torch
from triton.tools.tensor_descriptor import TensorDescriptor


def _tma_readable(t: torch.Tensor) -> bool:
    """What a TMA descriptor asks of its tensor: non-empty, the last dim contiguous,
    the base and the other strides multiples of 16 bytes, and none of them 0 (an
    expanded tensor, rows repeated: 0 is a multiple of 16, but the hardware's reading of
    a zero stride is undocumented, and the flattened wgrad would build such
    descriptors on the device, where nothing checks them)."""
    return (t.numel() > 0 and t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(stride > 0 and stride * t.element_size() % 16 == 0
                    for stride in t.stride()[:-1]))


def has_tma(device: torch.device) -> bool:
    """Hopper (sm_90) on: before it Triton rewrites descriptor loads to pointer loads,
    which the pointer configs already time. The interpreter runs them on CPU tensors."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def tma_descriptors(x_SX: torch.Tensor, w_EXY: torch.Tensor, gathered: bool = False):
    """(x, w, whether w is K-major) TMA descriptors for the forward's loads. x's is None
    where its rows are gathered (scattered: no TMA box holds them) or TMA cannot read
    it, and x then keeps to pointer loads. None for both (all loads through pointers)
    without TMA, where it cannot read w, and for fp32, whose (non-TF32) FMA dot on
    TMA-filled tiles compiles to thousands of register spills on sm_90
    (benchmarks/sm90_compile_check --sass). w is read as stored: [E, X, Y], or
    K-major, the transposed view of an [E, Y, X] tensor (nn.Linear's
    layout, which the MoE layer's forward passes), whose [N, K] tiles the kernel
    transposes in shared memory, as wgmma reads either. Block shapes are set per
    config (config.tma_block_shapes)."""
    w_kmajor = w_EXY.stride(2) != 1
    w_stored = w_EXY.transpose(1, 2) if w_kmajor else w_EXY
    if not _tma_usable(w_stored):
        return None
    return (_descriptor(x_SX, gathered), TensorDescriptor.from_tensor(w_stored, [1, 1, 1]),
            w_kmajor)


def wgrad_descriptors(x_SX: torch.Tensor, grad_y_SY: torch.Tensor, gathered: bool):
    """(x, dy) TMA descriptors for the wgrad's loads, on the terms of tma_descriptors
    (x's None where gathered), or None without one for dy. Block shapes are set per
    config (config.wgrad_tma_block_shapes)."""
    if not _tma_usable(grad_y_SY):
        return None
    return _descriptor(x_SX, gathered), TensorDescriptor.from_tensor(grad_y_SY, [1, 1])


def _tma_usable(t: torch.Tensor) -> bool:
    return has_tma(t.device) and t.element_size() == 2 and _tma_readable(t)


def _descriptor(x: torch.Tensor, gathered: bool):
    """x's 2-D descriptor (a dummy block shape), or None where x is read through pointers."""
    return None if gathered or not _tma_usable(x) else TensorDescriptor.from_tensor(x, [1, 1])
