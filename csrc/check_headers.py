"""Compiles every C++/CUDA source against another torch's headers (``make check-torch``).

The GPU machine builds the extension with its own torch (2.11), the venv here has
2.14.1: an API that one has and the other lacks would only show when the GPU run's
build fails, and those runs are short and rare. This compiles each source with the
build's flags against the headers unpacked from the other torch's wheel, for syntax
(C++) or to an object file (CUDA, sm_90; skipped without nvcc), and exits non-zero
naming each source that fails.

Usage: python csrc/check_headers.py TORCH_INCLUDE_DIR
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]


def include_flags(torch_include: Path) -> list[str]:
    """The other torch's headers first; the CUDA headers (pip's and the toolkit's) and
    Python's as the build finds them (see setup.py)."""
    site = Path(torch.__file__).parent.parent
    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    dirs = [torch_include, torch_include / "torch" / "csrc" / "api" / "include",
            *sorted(p for p in site.glob("nvidia/cu*/include") if p.is_dir()),
            cuda_home / "include", Path(sysconfig.get_paths()["include"])]
    return [f"-I{d}" for d in dirs]


def commands(torch_include: Path, scratch: Path) -> list[tuple[Path, list[str]]]:
    defines = ["-DDSV3_WITH_CUDA=1", "-DTORCH_API_INCLUDE_EXTENSION_H",
               "-DTORCH_EXTENSION_NAME=_C", "-std=c++20", "-O3"]
    flags = include_flags(torch_include) + defines
    jobs = [(source, ["c++", "-fsyntax-only", "-Wall", "-fopenmp", *flags, str(source)])
            for source in sorted(ROOT.glob("csrc/*.cpp")) + sorted(ROOT.glob("csrc/cpu/*.cpp"))]
    if shutil.which("nvcc"):
        jobs += [(source, ["nvcc", *flags, *cpp_extension.COMMON_NVCC_FLAGS,
                           "-gencode=arch=compute_90,code=sm_90", "-c", str(source),
                           "-o", str(scratch / f"{source.stem}.o")])
                 for source in sorted(ROOT.glob("csrc/cuda/*.cu"))]
    else:
        print("nvcc not found: the CUDA sources are not checked")
    return jobs


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not (Path(argv[0]) / "torch" / "extension.h").is_file():
        print(f"usage: {Path(__file__).name} TORCH_INCLUDE_DIR (the include/ folder of a torch "
              f"wheel, holding torch/extension.h)", file=sys.stderr)
        return 2
    failed = []
    with tempfile.TemporaryDirectory() as scratch:
        for source, command in commands(Path(argv[0]).resolve(), Path(scratch)):
            result = subprocess.run(command, capture_output=True, text=True)
            name = source.relative_to(ROOT)
            print(f"{'ok' if result.returncode == 0 else 'FAILED'} {name}", flush=True)
            if result.returncode != 0:
                failed.append(str(name))
                print(result.stderr[-4000:], file=sys.stderr)
    if failed:
        print(f"{len(failed)} sources failed against {argv[0]}: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
