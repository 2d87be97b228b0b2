"""The backends of the op test matrix: each computes the six ``lape_kernels`` ops on its device.

- ``reference``: lape_kernels/kernels/reference.py (the oracle itself; its checks are the error
  model's).
- ``cpu``: the compiled CPU kernels through torch.ops (bit-identical to the reference).
- ``triton``: the Triton kernels; on a machine without CUDA called directly on CPU tensors under
  the interpreter (TRITON_INTERPRET=1, set by tests/conftest.py), on a GPU through torch.ops with
  the "triton" backend.
- ``cuda_emulated``: the CUDA C++ backend's host code and per-thread kernel bodies compiled for
  the CPU (tests/ops/cuda_emulated.cpp), as the ops of the namespace lape_kernels_emu.
- ``cuda``: the CUDA C++ kernels through torch.ops (skipped without a GPU).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAS_CUDA = torch.cuda.is_available()
NAMES = ("reference", "cpu", "triton", "cuda_emulated", "cuda")
OP_NAMES = ("act_mul", "act_mul_count", "act_mul_backward", "act_mul_split", "act_mul_backward_split",
            "gate_up_act_mul_count")


@dataclass(frozen=True)
class Backend:
    name: str
    device: str  # where its tensors live
    ops: Any  # the six ops as attributes
    exact: bool  # bit-identical to the reference in every dtype (else: kernel_tolerance's model)
    interpreted: bool = False  # Triton under the CPU interpreter (its bf16 store truncates)


def _namespace(*modules) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{n: getattr(m, n) for m in modules for n in OP_NAMES if hasattr(m, n)})


_EMU_SOURCES = (
    os.path.join(ROOT, "tests", "ops", "cuda_emulated.cpp"),
    os.path.join(ROOT, "csrc", "cuda", "act_mul_host.h"),
    os.path.join(ROOT, "csrc", "cuda", "act_mul_kernels.cuh"),
    os.path.join(ROOT, "csrc", "common", "checks.h"),
    os.path.join(ROOT, "csrc", "common", "act.h"),
    os.path.join(ROOT, "csrc", "common", "schemas.h"),
)


def load_cuda_emulated():
    """Build (once per source version: the name carries a hash of every source and header) and
    load tests/ops/cuda_emulated.cpp; returns torch.ops.lape_kernels_emu."""
    if hasattr(torch.ops, "lape_kernels_emu") and hasattr(torch.ops.lape_kernels_emu, "act_mul"):
        return torch.ops.lape_kernels_emu
    from torch.utils import cpp_extension

    digest = hashlib.sha256()
    for path in _EMU_SOURCES:
        with open(path, "rb") as f:
            digest.update(f.read())
    name = f"lape_cuda_emulated_{digest.hexdigest()[:16]}"
    cpp_extension.load(
        name=name,
        sources=[_EMU_SOURCES[0]],
        extra_include_paths=[os.path.join(ROOT, "csrc", "cuda"), os.path.join(ROOT, "csrc", "common")],
        extra_cflags=["-O1", "-w"],
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.lape_kernels_emu


@contextlib.contextmanager
def cuda_backend(name: str) -> Iterator[None]:
    """torch.ops.lape_kernels on CUDA tensors runs the ``name`` backend inside the block."""
    from lape_kernels.kernels import ops

    previous = ops.current_cuda_backend()
    ops.use_cuda_backend(name)
    try:
        yield
    finally:
        ops.use_cuda_backend(previous)


def make_backend(name: str) -> Backend:
    """The backend ``name``, or pytest.skip when this machine cannot run it."""
    if name == "reference":
        from lape_kernels.kernels import reference

        return Backend(name, "cpu", _namespace(reference), exact=True)
    if name == "cpu":
        from lape_kernels.kernels import ops

        return Backend(name, "cpu", _namespace(ops), exact=True)
    if name == "triton":
        if HAS_CUDA:
            return Backend(name, "cuda", torch.ops.lape_kernels, exact=False)
        pytest.importorskip("triton")
        from lape_kernels.kernels import triton_elementwise, triton_gemm

        return Backend(name, "cpu", _namespace(triton_elementwise, triton_gemm), exact=False, interpreted=True)
    if name == "cuda_emulated":
        return Backend(name, "cpu", load_cuda_emulated(), exact=False)
    if name == "cuda":
        from lape_kernels.kernels import ops

        if not HAS_CUDA:
            pytest.skip("needs a CUDA GPU")
        if not ops._HAS_CUDA_CPP:
            pytest.skip("the CUDA C++ kernels are not compiled in")
        return Backend(name, "cuda", torch.ops.lape_kernels, exact=False)
    raise ValueError(f"unknown backend {name!r}; known: {NAMES}")


@contextlib.contextmanager
def selected(backend: Backend) -> Iterator[Backend]:
    """Run the block with ``backend`` selected (CUDA backends switch torch.ops' CUDA kernels)."""
    if backend.device == "cuda":
        with cuda_backend("cuda" if backend.name == "cuda" else "triton"):
            yield backend
    else:
        yield backend


def run_gpu_compile_script(script: str, expect: str) -> None:
    """Run ``script`` (Triton compiling kernels to cubin for GPU targets) in a fresh interpreter
    without TRITON_INTERPRET; it must print ``expect``."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert expect in res.stdout, res.stdout[-2000:]
