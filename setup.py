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
``LAPE_KERNELS_NO_CUDA=1`` skips the CUDA kernels. CUDA targets: ``TORCH_CUDA_ARCH_LIST`` as for
any torch extension (unset: the visible GPUs' architectures, or 8.0 and 9.0+PTX without a GPU).
An nvcc whose major version differs from torch's CUDA cannot build the CUDA kernels: the build
then leaves them out with a message saying what to install (``LAPE_KERNELS_REQUIRE_CUDA=1``
makes it an error instead); the Triton backend serves CUDA tensors meanwhile.
"""
from __future__ import annotations

import glob
import os
import platform
import re
import subprocess
import sys
from typing import Optional

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


def nvcc_mismatch(nvcc_version: str, torch_cuda: str, nvcc: str = "nvcc") -> Optional[str]:
    """Why `nvcc --version`'s output ``nvcc_version`` cannot build for torch's CUDA ``torch_cuda``
    ("12.8"), or None when the major versions match."""
    found = re.search(r"release (\d+)\.(\d+)", nvcc_version)
    if found is None:
        return f"could not read the CUDA version from `{nvcc} --version`"
    have, want = f"{found.group(1)}.{found.group(2)}", torch_cuda
    if int(found.group(1)) == int(want.split(".")[0]):
        return None
    return (f"{nvcc} is CUDA {have} but torch was built with CUDA {want}: install a CUDA {want.split('.')[0]}.x "
            f"toolkit and point CUDA_HOME at it (or a torch built for CUDA {found.group(1)})")


def cuda_arch_list(env: dict, visible_gpus: int) -> Optional[str]:
    """TORCH_CUDA_ARCH_LIST to set, or None to leave torch's choice: the user's list always wins,
    torch targets the visible GPUs by itself; without either, sm_80 and sm_90 (+PTX)."""
    if env.get("TORCH_CUDA_ARCH_LIST") or visible_gpus > 0:
        return None
    return "8.0;9.0+PTX"


def _with_cuda() -> bool:
    import torch

    if os.environ.get("LAPE_KERNELS_NO_CUDA", "0") not in ("", "0"):
        return False
    if not torch.version.cuda or cpp_extension.CUDA_HOME is None:
        return False
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    try:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except OSError as exc:
        version = str(exc)
    problem = nvcc_mismatch(version, torch.version.cuda, nvcc)
    if problem is not None:
        if os.environ.get("LAPE_KERNELS_REQUIRE_CUDA", "0") not in ("", "0"):
            raise SystemExit(f"lape_kernels: {problem}")
        print(f"lape_kernels: building without the CUDA C++ kernels (the Triton backend serves CUDA tensors): "
              f"{problem}; LAPE_KERNELS_NO_CUDA=1 silences this", file=sys.stderr)
        return False
    arch = cuda_arch_list(os.environ, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if arch is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    return True


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
                    # Precise math (no --use_fast_math): counts must be exact. Targets come from
                    # TORCH_CUDA_ARCH_LIST (see _with_cuda), not from -gencode flags here.
                    "nvcc": ["-O3"],
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
