"""Launch settings shared by the Triton kernels: autotune configs (one small,
sane set on GPUs; a single config under the interpreter, where every program
runs at Python speed) and the tl.dot precision per dtype."""
import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def matmul_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32})]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    ]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use TF32 only when the user allowed it for matmuls, as torch does."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"
