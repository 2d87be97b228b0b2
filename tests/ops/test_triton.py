"""The Triton kernels beyond the test matrix (tests/ops/test_matrix.py): tile and grid overrides
(several programs per column block, partial tiles, language runs across tiles), their compilation
for sm_90/sm_80 without a GPU, and a Llama-3.1-8B-sized count on a GPU.

Without CUDA the kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set
by tests/conftest.py before triton is imported).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends import make_backend, run_gpu_compile_script
from inputs import DTYPES, gate_up, lang_ids, randn, sorted_sel
from kernel_tolerance import check_op
from lape_kernels.kernels.checks import ACTIVATIONS

tk = pytest.importorskip("lape_kernels.kernels.triton_elementwise")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = make_backend("triton")


def check_tiled(T, I, dtype, activation, tiles, ks=(0, 7), lang_mode="runs", num_langs=3, seed=0):
    """Every op through the *_impl entry points with tile / grid overrides, against the reference."""
    gate, up = gate_up(T, I, dtype, "halves", seed=seed, device=DEVICE)
    lang = lang_ids(T, num_langs, seed=seed, mode=lang_mode, device=DEVICE)
    check_op(TRITON, "act_mul", tk._fwd_impl(gate, up, activation, **tiles)[0], gate, up, activation)
    o = tk._fwd_impl(gate, up, activation, count=True, token_lang=lang, num_langs=num_langs, **tiles)
    check_op(TRITON, "act_mul_count", (o[0], o[2], o[3]), gate, up, activation, lang, num_langs)
    grad_out = randn(T, I, dtype=dtype, seed=seed + 1, device=DEVICE)
    check_op(TRITON, "act_mul_backward", tk._bwd_impl(grad_out, gate, up, activation, **tiles)[:2],
             grad_out, gate, up, activation)
    for k in ks:
        sel = sorted_sel(I, k, seed=k, device=DEVICE)
        gos = randn(T, k, dtype=dtype, seed=seed + 2, device=DEVICE)
        o = tk._fwd_impl(gate, up, activation, sel=sel, **tiles)
        check_op(TRITON, "act_mul_split", (o[0], o[1]), gate, up, activation, sel)
        g = tk._bwd_impl(grad_out, gate, up, activation, grad_out_sel=gos, sel=sel, **tiles)
        check_op(TRITON, "act_mul_backward_split", g[:2] + g[2], grad_out, gos, gate, up, activation, sel)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_partial_tiles_and_several_row_programs(activation):
    """Small tiles, I and T not multiples of them, several programs per column block."""
    check_tiled(45, 50, torch.float32, activation, dict(block_t=8, block_i=16, row_progs=3), ks=(0, 7, 50))


@pytest.mark.parametrize("run", [8, 16, 24, 5])
@pytest.mark.parametrize("row_progs", [1, 2])
def test_count_language_runs_across_tiles(run, row_progs):
    """Runs of one language per tile, changing between tiles of a program (counter flushes)."""
    T, I, L = 96, 20, 3
    gate, up = gate_up(T, I, torch.float32, "halves", seed=run, device=DEVICE)
    lang = ((torch.arange(T) // run) % (L + 1) - 1).to(DEVICE)  # -1, 0, 1, 2, -1, ...
    o = tk._fwd_impl(gate, up, "gelu", count=True, token_lang=lang, num_langs=L, block_t=8, block_i=16,
                     row_progs=row_progs)
    check_op(TRITON, "act_mul_count", (o[0], o[2], o[3]), gate, up, "gelu", lang, L)


# On a GPU every new tiling is a Triton compilation (~1 s): fewer examples there.
@settings(max_examples=25 if DEVICE == "cpu" else 10, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(0, 40),
    I=st.integers(1, 70),
    block_t=st.sampled_from([8, 16]),
    block_i=st.sampled_from([16, 32, 64]),
    row_progs=st.integers(1, 4),
    num_langs=st.integers(1, 4),
    lang_mode=st.sampled_from(("runs", "alternating", "random")),
    dtype=st.sampled_from(DTYPES),
    activation=st.sampled_from(ACTIVATIONS),
    seed=st.integers(0, 2**16),
)
def test_count_property(T, I, block_t, block_i, row_progs, num_langs, lang_mode, dtype, activation, seed):
    """Any shape, tiling and language layout: counts exact, sums and values within tolerance."""
    gate, up = gate_up(T, I, dtype, "halves", seed=seed, device=DEVICE)
    lang = lang_ids(T, num_langs, seed=seed, mode=lang_mode, device=DEVICE)
    o = tk._fwd_impl(gate, up, activation, count=True, token_lang=lang, num_langs=num_langs,
                     block_t=block_t, block_i=block_i, row_progs=row_progs)
    check_op(TRITON, "act_mul_count", (o[0], o[2], o[3]), gate, up, activation, lang, num_langs)


# ------------------------------------------------- GPU compilation without a GPU (CPU machines) --

COMPILE_SCRIPT = r"""
import itertools, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lape_kernels.kernels import triton_elementwise as tk

PTR = {"gate_ptr": "T", "up_ptr": "T", "out_ptr": "T", "sel_out_ptr": "T", "slot_ptr": "i32",
       "sel_ptr": "i32", "start_ptr": "i32", "lang_ptr": "i64", "oz_ptr": "i64", "sum_ptr": "fp64",
       "go_ptr": "T", "gos_ptr": "T", "gg_ptr": "T", "gu_ptr": "T", "ggs_ptr": "T", "gus_ptr": "T", "os_ptr": "T"}
DT = {"fp32": 0, "bf16": 1, "fp16": 2}

def compile_one(fn, dt, consts, num_warps, arch):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in PTR:
            sig[name] = "*" + (dt if PTR[name] == "T" else PTR[name])
        else:
            sig[name] = "i32"
    src = ASTSource(fn, sig, consts)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    assert k.asm.get("cubin"), "no cubin"

n = 0
for arch in (90, 80):
    for dt, act in itertools.chain(itertools.product(["bf16"], [0, 1, 2]), [("fp16", 0), ("fp32", 2)]):
        for count, split, has_lang in [(False, False, False), (True, False, True), (True, False, False),
                                       (False, True, False)]:
            bt, bi, nw, _ = tk.CONFIGS["count" if count else "fwd"]
            compile_one(tk._fwd_kernel, dt, dict(ACT=act, DT=DT[dt], PRECISE=True, COUNT=count, SPLIT=split,
                                                 HAS_LANG=has_lang, BLOCK_T=bt, BLOCK_I=bi,
                                                 SEL_BLOCK=tk.SEL_BLOCK), nw, arch)
            n += 1
        for split in (False, True):
            bt, bi, nw, _ = tk.CONFIGS["bwd"]
            compile_one(tk._bwd_kernel, dt, dict(ACT=act, DT=DT[dt], PRECISE=True, SPLIT=split, BLOCK_T=bt,
                                                 BLOCK_I=bi, SEL_BLOCK=tk.SEL_BLOCK), nw, arch)
            n += 1
        if arch == 80:
            break  # one dtype/activation is enough to check the older target
print("compiled", n)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are compiled and run for real")
def test_kernels_compile_for_hopper_and_ampere():
    """The interpreter does not compile: build every kernel variant for sm_90 (and sm_80) to cubin."""
    run_gpu_compile_script(COMPILE_SCRIPT, "compiled 36")


# ------------------------------------------------------------------------------------ on a GPU --

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda_only
def test_triton_count_exact_at_llama_8b_size():
    """T=4096 x I=14336 bf16 with per-token languages: Triton counts bit-exact."""
    T, I = 4096, 14336
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate = torch.randn(T, I, device="cuda", generator=gen, dtype=torch.bfloat16)
    up = torch.randn(T, I, device="cuda", generator=gen, dtype=torch.bfloat16)
    lang = torch.arange(T, device="cuda") // 300 % 5 - 1
    check_op(TRITON, "act_mul_count", tk.act_mul_count(gate, up, "silu", lang, 4), gate, up, "silu", lang, 4)


def test_count_ignores_ids_that_wrap_into_range():
    """ids 2^32 and 2^32 + 1 are not languages 0 and 1 (the range check runs on the int64 id)."""
    gate, up = gate_up(16, 24, torch.float32, "halves", seed=9, device=DEVICE)
    lang = torch.tensor([2**32, 2**32 + 1] * 8, device=DEVICE)
    for tiles in ({}, dict(block_t=8, block_i=16, row_progs=2)):
        o = tk._fwd_impl(gate, up, "silu", count=True, token_lang=lang, num_langs=2, **tiles)
        assert int(o[2].abs().sum()) == 0 and float(o[3].abs().sum()) == 0.0


def test_grid_from_occupancy():
    """On a GPU the row ranges per column block come from the compiled kernel's occupancy and
    fill whole waves (never one wave plus a few programs that then run alone)."""
    from types import SimpleNamespace

    h100 = SimpleNamespace(regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                           shared_memory_per_multiprocessor=228 * 1024)
    assert tk.resident_programs(120, 8, 0, h100) == 2  # 120 registers x 256 threads
    assert tk.resident_programs(40, 4, 0, h100) == 12  # 2048 threads / 128
    assert tk.resident_programs(32, 4, 64 * 1024, h100) == 3  # shared memory bound
    resident = 2 * 132
    for col_blocks, row_blocks in ((112, 256), (112, 1), (300, 64), (7, 3)):
        row_progs = tk.whole_waves(resident, col_blocks, row_blocks)
        assert 1 <= row_progs <= row_blocks
        assert col_blocks * row_progs <= max(resident, col_blocks)  # at most one wave
        assert row_progs == row_blocks or col_blocks * (row_progs + 1) > resident  # and no less
