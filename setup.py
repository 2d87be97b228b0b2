"""Build of lape_kernels and its compiled ops.

Extension modules (all in the `lape_kernels` package):

* ``_C`` - the op schemas (csrc/lape_kernels.cpp) plus, when torch has CUDA and nvcc is found,
  the CUDA kernels (csrc/cuda/*.cu). Importing it loads the best CPU kernel module below.
* ``_cpu_default``, ``_cpu_avx2``, ``_cpu_avx512`` - the CPU kernels (csrc/cpu/kernels.h),
  compiled once per CPU capability with that capability's ISA flags, like PyTorch's own CPU
  kernels. No ``-march=native``: the build runs anywhere its ISA level runs, and the choice
  between them is made at import time by PyTorch's CPU capability detection.

Build (what the Makefile runs): ``pip install --no-build-isolation --no-deps -e .``
``LAPE_KERNELS_CPU_ISAS=default,avx2`` limits the CPU variants built (``default`` always is);
``LAPE_KERNELS_NO_CUDA=1`` skips the CUDA kernels.
"""
from __future__ import annotations

import glob
import os
import platform

from setuptools import setup
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

# -O3 with precise fp math (no -ffast-math: counts depend on exact signs). FMA contraction stays
# at GCC's default, as in PyTorch's own build: the forward activations then round exactly as
# F.silu / F.gelu(approximate="tanh") do.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function"]
LINK_FLAGS = ["-fopenmp"]

# Same ISA flags PyTorch uses for its CPU_CAPABILITY builds.
ISA_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def _cpu_isas() -> list[str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["default"]
    wanted = os.environ.get("LAPE_KERNELS_CPU_ISAS", "default,avx2,avx512")
    isas = [s.strip().lower() for s in wanted.split(",") if s.strip()]
    unknown = sorted(set(isas) - set(ISA_FLAGS))
    if unknown:
        raise SystemExit(f"LAPE_KERNELS_CPU_ISAS: unknown ISA(s) {unknown}, choose from {sorted(ISA_FLAGS)}")
    return ["default"] + [i for i in ("avx2", "avx512") if i in isas]


def _with_cuda() -> bool:
    import torch

    if os.environ.get("LAPE_KERNELS_NO_CUDA", "0") not in ("", "0"):
        return False
    return bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None


def _extensions():
    rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731 - setuptools wants relative paths
    exts = []
    cuda_sources = sorted(rel(p) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    c_sources = ["csrc/lape_kernels.cpp"]
    if _with_cuda() and cuda_sources:
        from torch.utils.cpp_extension import CUDAExtension

        exts.append(
            CUDAExtension(
                "lape_kernels._C",
                c_sources + cuda_sources,
                extra_compile_args={
                    "cxx": CXX_FLAGS,
                    # Precise math (no --use_fast_math): counts must be exact.
                    "nvcc": [
                        "-O3",
                        "-gencode=arch=compute_80,code=sm_80",
                        "-gencode=arch=compute_90,code=sm_90",
                        "-gencode=arch=compute_90,code=compute_90",
                    ],
                },
                extra_link_args=LINK_FLAGS,
            )
        )
    else:
        exts.append(
            CppExtension("lape_kernels._C", c_sources, extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=LINK_FLAGS)
        )
    for isa in _cpu_isas():
        exts.append(
            CppExtension(
                f"lape_kernels._cpu_{isa}",
                [f"csrc/cpu/kernels_{isa}.cpp"],
                include_dirs=[os.path.join(ROOT, "csrc", "cpu")],
                extra_compile_args={"cxx": CXX_FLAGS + ISA_FLAGS[isa]},
                extra_link_args=LINK_FLAGS,
            )
        )
    return exts


# Metadata, dependencies and the console script live in pyproject.toml; this file only
# declares the compiled extensions, which need torch's build helpers.
setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
