"""Builds the one compiled extension, ``dsv3._C``.

The CPU kernels (csrc/cpu, OpenMP) are always built. The CUDA kernels (csrc/cuda)
are added when torch was built with CUDA and nvcc is found; ``DSV3_BUILD_CUDA=0|1``
overrides that guess and ``DSV3_CUDA_ARCHS`` (default "80;90") picks the targets.
``CUDA_HOME`` defaults to /usr/local/cuda: torch otherwise guesses it from nvcc's path
(/usr/local where nvcc is linked into /usr/local/bin), where the toolkit's headers are
not. pip's CUDA wheels ship some headers (cuSPARSE and friends, which torch's headers
include) outside the toolkit, under site-packages/nvidia/cu*/include: those
directories are added to the include path.
"""
import glob
import os
import shutil
from pathlib import Path

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = Path(__file__).parent


def cuda_wanted() -> bool:
    forced = os.environ.get("DSV3_BUILD_CUDA")
    if forced is not None:
        return forced == "1"
    has_sources = bool(glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu")))
    return has_sources and torch.version.cuda is not None and shutil.which("nvcc") is not None


def nvidia_include_dirs() -> list[str]:
    """Headers that pip's CUDA wheels ship outside CUDA_HOME (cuSPARSE and friends)."""
    site = Path(torch.__file__).parent.parent
    return [str(p) for p in site.glob("nvidia/cu*/include") if p.is_dir()]


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fno-trapping-math: nothing here reads the floating-point exception flags, and
    # without it GCC leaves every loop with a compare-and-select (vec::fast_exp's clamp:
    # SwiGLU, the router) scalar in its AVX2 and baseline builds; results are unchanged
    # (no reassociation, no contraction: that is -ffast-math's, not this).
    cxx_flags = ["-O3", "-fopenmp", "-std=c++20", "-fno-trapping-math"]
    link_flags = ["-fopenmp"]
    if not cuda_wanted():
        return cpp_extension.CppExtension(
            "dsv3._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    archs = os.environ.get("DSV3_CUDA_ARCHS", "80;90").split(";")
    arch_flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    return cpp_extension.CUDAExtension(
        "dsv3._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=nvidia_include_dirs(),
        define_macros=[("DSV3_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", *arch_flags]},
        extra_link_args=link_flags,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
