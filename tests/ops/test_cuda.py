"""The CUDA C++ kernels (csrc/cuda/) beyond the test matrix (tests/ops/test_matrix.py, where they
run as the ``cuda_emulated`` backend everywhere and as ``cuda`` on a GPU).

- Emulated on the CPU (tests/ops/cuda_emulated.cpp: the host code of act_mul_host.h and the
  per-thread bodies of act_mul_kernels.cuh, one emulated thread after another): the launch plan
  covers every row and column once, both vector widths, and grids of one or of many row chunks
  (many per-language counter flushes, partial row groups).
- nvcc compiles csrc/cuda for sm_90 here (slow: the same headers as the real build).
- On a GPU (skipped otherwise): a Llama-3.1-8B-sized count, and switching between the "cuda" and
  "triton" backends.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch

from backends import ROOT, cuda_backend, load_cuda_emulated, make_backend
from inputs import DTYPES, gate_up, lang_ids, randn, sorted_sel
from kernel_tolerance import check_op
from lape_kernels.kernels.checks import ACTIVATIONS


@pytest.fixture(scope="module")
def emu():
    return load_cuda_emulated()


@contextlib.contextmanager
def resident_blocks(emu, n):
    old = emu.set_resident_blocks(n)
    try:
        yield
    finally:
        emu.set_resident_blocks(old)


# ====================================================================== CPU emulation ====


@pytest.mark.parametrize("T", [1, 3, 4, 5, 17, 4096, 16384, 300000])
@pytest.mark.parametrize("I", [1, 7, 8, 14336])
@pytest.mark.parametrize("resident", [1, 132 * 4, 132 * 16, 1 << 40])
def test_plan_covers_every_row_and_column_once(emu, T, I, resident):
    for vec in (1, 8):
        col_groups, grid_x, chunks, rows_per_chunk = emu.plan(T, I, vec, 128, resident)
        assert col_groups * vec >= I and (col_groups - 1) * vec < I
        assert grid_x * 128 >= col_groups and (grid_x - 1) * 128 < col_groups
        assert 1 <= chunks <= 65535
        assert chunks * rows_per_chunk >= T and (chunks - 1) * rows_per_chunk < T
        assert chunks <= max(1, -(-T // 4))  # about kRows (4) rows per chunk at least
        # at most one wave: never a full wave plus a few blocks that then run alone
        assert grid_x * chunks <= max(resident, grid_x)


def test_vector_width_rule(emu):
    """16-byte vectors only for aligned operands whose rows are whole vectors."""
    assert emu.vectorised(torch.empty(4, 16, dtype=torch.bfloat16))
    assert emu.vectorised(torch.empty(4, 32)[:, 16:])  # row stride 32, offset 16 floats: aligned
    assert not emu.vectorised(torch.empty(4, 13))
    assert not emu.vectorised(torch.empty(4, 17, dtype=torch.bfloat16)[:, 1:])  # starts 2 bytes in


@pytest.mark.parametrize("resident", [1, 1 << 30], ids=["one_chunk", "many_chunks"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_grids_and_vector_paths(emu, activation, dtype, resident):
    """Long row loops per thread (few counter flushes) and kRows-row chunks (many), on the vector
    path (I = 48) and the scalar one (an operand that starts one element into its storage)."""
    backend = make_backend("cuda_emulated")
    buf = randn(37, 2 * 48 + 1, dtype=dtype, seed=3, scale=3.0)
    layouts = {"vector": gate_up(37, 48, dtype, "halves", seed=1), "scalar": (buf[:, 1:49], buf[:, 49:])}
    with resident_blocks(emu, resident):
        for path, (gate, up) in layouts.items():
            assert emu.vectorised(gate) == (path == "vector")
            lang = lang_ids(37, 3, seed=2)
            check_op(backend, "act_mul_count", emu.act_mul_count(gate, up, activation, lang, 3),
                     gate, up, activation, lang, 3)
            grad_out = randn(37, 48, dtype=dtype, seed=4)
            for k in (0, 11, 48):
                sel = sorted_sel(48, k, seed=k)
                check_op(backend, "act_mul_split", emu.act_mul_split(gate, up, activation, sel), gate, up,
                         activation, sel)
                gos = randn(37, k, dtype=dtype, seed=5)
                check_op(backend, "act_mul_backward_split",
                         emu.act_mul_backward_split(grad_out, gos, gate, up, activation, sel),
                         grad_out, gos, gate, up, activation, sel)


# ====================================================================== nvcc for sm_90 ====


@pytest.mark.slow
def test_cuda_sources_compile_for_hopper(tmp_path):
    """nvcc compiles csrc/cuda/act_mul_cuda.cu for sm_90 against this torch's headers (the CPU
    wheel lacks one generated CUDA header: a stub stands in for it)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [nvcc, "-std=c++20", "-O3", "-gencode=arch=compute_90,code=sm_90", "--expt-relaxed-constexpr",
           "-c", os.path.join(ROOT, "csrc", "cuda", "act_mul_cuda.cu"), "-o", str(tmp_path / "act_mul_cuda.o"),
           f"-I{tmp_path / 'stub'}", f"-I{sysconfig.get_paths()['include']}"]
    cmd += [f"-I{p}" for p in include_paths()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / "act_mul_cuda.o").stat().st_size > 0


# ========================================================================== on CUDA ====

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda_only
def test_cuda_count_exact_at_llama_8b_size():
    """T=4096 tokens x I=14336 (Llama-3.1-8B MLP), bf16, 4 languages: counts bit-exact."""
    backend = make_backend("cuda")
    T, I = 4096, 14336
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate = torch.randn(T, I, device="cuda", generator=gen, dtype=torch.bfloat16)
    up = torch.randn(T, I, device="cuda", generator=gen, dtype=torch.bfloat16)
    lang = torch.arange(T, device="cuda") // 512 % 5 - 1  # runs of 512 tokens, one padding run
    with cuda_backend("cuda"):
        check_op(backend, "act_mul_count", torch.ops.lape_kernels.act_mul_count(gate, up, "silu", lang, 4),
                 gate, up, "silu", lang, 4)


@cuda_only
def test_cuda_and_triton_backends_agree_and_switch():
    """use_cuda_backend switches the kernels behind torch.ops; both give the reference's counts."""
    from lape_kernels.kernels import ops as lk_ops

    backend = make_backend("cuda")
    T, I = 300, 1000
    gate, up = gate_up(T, I, torch.bfloat16, "halves", device="cuda")
    lang = lang_ids(T, 4, device="cuda")
    for name in ("cuda", "triton", "cuda"):
        assert lk_ops.use_cuda_backend(name) == name and lk_ops.current_cuda_backend() == name
        check_op(backend, "act_mul_count", torch.ops.lape_kernels.act_mul_count(gate, up, "gelu_tanh", lang, 4),
                 gate, up, "gelu_tanh", lang, 4)


# ====================================================================== setup.py's choices ====


def test_setup_cuda_targets_and_nvcc_check(monkeypatch):
    """TORCH_CUDA_ARCH_LIST decides the targets (no -gencode flags of our own); an nvcc whose
    major version differs from torch's CUDA is reported with what to install."""
    import runpy

    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    g = runpy.run_path(os.path.join(ROOT, "setup.py"))
    mismatch, arch = g["nvcc_mismatch"], g["cuda_arch_list"]
    assert mismatch("Cuda compilation tools, release 12.8, V12.8.93", "12.8") is None
    assert mismatch("Cuda compilation tools, release 12.4, V12.4.131", "12.8") is None  # same major
    msg = mismatch("Cuda compilation tools, release 13.0, V13.0.88", "12.8", "/usr/local/cuda/bin/nvcc")
    assert "CUDA 13.0" in msg and "CUDA 12.8" in msg and "CUDA 12.x" in msg and "CUDA_HOME" in msg
    assert mismatch("nvcc: command not found", "12.8").startswith("could not read the CUDA version")
    assert arch({"TORCH_CUDA_ARCH_LIST": "9.0"}, 0) is None  # the user's list wins
    assert arch({}, 1) is None  # torch targets the visible GPUs
    assert arch({}, 0) == "8.0;9.0+PTX"
    with open(os.path.join(ROOT, "setup.py")) as f:
        assert "-gencode" not in f.read().replace("not from -gencode flags", "")
