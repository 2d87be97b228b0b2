"""Tests of the CUDA C++ kernels (csrc/cuda/).

Two parts:
- CPU emulation (runs everywhere a C++ compiler is found): the kernels' per-thread bodies in
  csrc/cuda/act_mul_kernels.cuh are plain host/device C++, so they are compiled here with g++
  and run one emulated thread after another (vector and scalar paths, several grid plans)
  against lape_kernels/reference.py. This checks indexing, masking, the split slots and the
  per-language count flushing without a GPU.
- On CUDA (skipped otherwise): the real ops, torch.ops.lape_kernels.* with the "cuda" backend,
  for every op and dtype against the reference, a Llama-3.1-8B-sized count for exactness, the
  argument checks, and switching between the "cuda" and "triton" backends.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from lape_kernels.kernels import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
ACTS = ("silu", "gelu_tanh", "gelu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACT_ID = {"silu": 0, "gelu_tanh": 1, "gelu": 2}
DTYPE_ID = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
from kernel_tolerance import TOL, COND, act_scale, fwd_scale, bwd_scales, check_close, check_count, check_backward, check_split, check_backward_split  # noqa: E402


def gate_up_halves(T, I, dtype, device="cpu", scale=3.0, seed=0):
    """gate/up as the two halves of one [T, 2I] tensor (row stride 2I), like Phi-3's gate_up."""
    g = torch.Generator().manual_seed(seed)
    both = (torch.randn(T, 2 * I, generator=g) * scale).to(dtype).to(device)
    return both[:, :I], both[:, I:]


def runs_lang(T, num_langs, seed=0):
    """token_lang with long runs, some mixed stretches, padding (-1) and out-of-range ids."""
    g = torch.Generator().manual_seed(seed)
    lang = torch.empty(T, dtype=torch.int64)
    pos = 0
    while pos < T:
        n = int(torch.randint(1, 12, (1,), generator=g))
        lang[pos : pos + n] = int(torch.randint(-1, num_langs + 1, (1,), generator=g))
        pos += n
    mixed = torch.rand(T, generator=g) < 0.15
    lang[mixed] = torch.randint(-1, num_langs + 1, (int(mixed.sum()),), generator=g)
    return lang


def sorted_sel(I, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(I, generator=g)[:k].sort().values


# ====================================================================== CPU emulation ====

HARNESS = r"""
#include "act_mul_kernels.cuh"
using namespace lape_kernels::cuda_impl;

template <typename T, int VEC, int ACT, bool COUNT, bool SPLIT>
void emu_fwd(FwdParams<T> p, int threads, int64_t resident) {
  const Plan pl = make_plan(p.rows, p.cols, VEC, threads, resident);
  p.rows_per_chunk = pl.rows_per_chunk;
  for (int64_t by = 0; by < pl.chunks; ++by)
    for (int64_t bx = 0; bx < pl.grid_x; ++bx)
      for (int t = 0; t < threads; ++t) fwd_thread<T, VEC, ACT, COUNT, SPLIT>(p, bx * threads + t, by);
}

template <typename T, int VEC, int ACT, bool SPLIT>
void emu_bwd(BwdParams<T> p, int threads, int64_t resident) {
  const Plan pl = make_plan(p.rows, p.cols, VEC, threads, resident);
  p.rows_per_chunk = pl.rows_per_chunk;
  for (int64_t by = 0; by < pl.chunks; ++by)
    for (int64_t bx = 0; bx < pl.grid_x; ++bx)
      for (int t = 0; t < threads; ++t) bwd_thread<T, VEC, ACT, SPLIT>(p, bx * threads + t, by);
}

template <typename T, int VEC, int ACT>
void fwd_mode(int mode, const FwdParams<T>& p, int th, int64_t res) {
  if (mode == 0) emu_fwd<T, VEC, ACT, false, false>(p, th, res);
  else if (mode == 1) emu_fwd<T, VEC, ACT, true, false>(p, th, res);
  else emu_fwd<T, VEC, ACT, false, true>(p, th, res);
}

template <typename T, int VEC>
void fwd_act(int act, int mode, const FwdParams<T>& p, int th, int64_t res) {
  if (act == 0) fwd_mode<T, VEC, kSilu>(mode, p, th, res);
  else if (act == 1) fwd_mode<T, VEC, kGeluTanh>(mode, p, th, res);
  else fwd_mode<T, VEC, kGelu>(mode, p, th, res);
}

template <typename T, int VEC>
void bwd_act(int act, int split, const BwdParams<T>& p, int th, int64_t res) {
  if (act == 0) { if (split) emu_bwd<T, VEC, kSilu, true>(p, th, res); else emu_bwd<T, VEC, kSilu, false>(p, th, res); }
  else if (act == 1) { if (split) emu_bwd<T, VEC, kGeluTanh, true>(p, th, res); else emu_bwd<T, VEC, kGeluTanh, false>(p, th, res); }
  else { if (split) emu_bwd<T, VEC, kGelu, true>(p, th, res); else emu_bwd<T, VEC, kGelu, false>(p, th, res); }
}

template <typename T>
void fwd_typed(int vec, int act, int mode, const void* gate, const void* up, int64_t sg, int64_t su,
               void* out, void* out_sel, const int32_t* slot, const int64_t* lang, int64_t num_langs,
               int64_t* oz, double* sum, int64_t rows, int64_t cols, int64_t k, int th, int64_t res) {
  FwdParams<T> p{};
  p.gate = static_cast<const T*>(gate); p.up = static_cast<const T*>(up);
  p.stride_gate = sg; p.stride_up = su;
  p.out = static_cast<T*>(out); p.out_sel = static_cast<T*>(out_sel); p.slot = slot;
  p.token_lang = lang; p.num_langs = num_langs; p.over_zero = oz; p.act_sum = sum;
  p.rows = rows; p.cols = cols; p.k = k;
  if (vec) fwd_act<T, 16 / sizeof(T)>(act, mode, p, th, res); else fwd_act<T, 1>(act, mode, p, th, res);
}

template <typename T>
void bwd_typed(int vec, int act, int split, const void* go, const void* gos, const void* gate,
               const void* up, int64_t sgo, int64_t sg, int64_t su, void* gg, void* gu, void* ggs,
               void* gus, void* os, const int32_t* slot, int64_t rows, int64_t cols, int64_t k,
               int th, int64_t res) {
  BwdParams<T> p{};
  p.grad_out = static_cast<const T*>(go); p.grad_out_sel = static_cast<const T*>(gos);
  p.gate = static_cast<const T*>(gate); p.up = static_cast<const T*>(up);
  p.stride_grad = sgo; p.stride_gate = sg; p.stride_up = su;
  p.grad_gate = static_cast<T*>(gg); p.grad_up = static_cast<T*>(gu);
  p.grad_gate_sel = static_cast<T*>(ggs); p.grad_up_sel = static_cast<T*>(gus);
  p.out_sel = static_cast<T*>(os); p.slot = slot;
  p.rows = rows; p.cols = cols; p.k = k;
  if (vec) bwd_act<T, 16 / sizeof(T)>(act, split, p, th, res); else bwd_act<T, 1>(act, split, p, th, res);
}

extern "C" {

void lape_emu_fwd(int dtype, int vec, int act, int mode, const void* gate, const void* up,
                  int64_t sg, int64_t su, void* out, void* out_sel, const int32_t* slot,
                  const int64_t* lang, int64_t num_langs, int64_t* oz, double* sum, int64_t rows,
                  int64_t cols, int64_t k, int th, int64_t res) {
  if (dtype == 0) fwd_typed<float>(vec, act, mode, gate, up, sg, su, out, out_sel, slot, lang, num_langs, oz, sum, rows, cols, k, th, res);
  else if (dtype == 1) fwd_typed<c10::BFloat16>(vec, act, mode, gate, up, sg, su, out, out_sel, slot, lang, num_langs, oz, sum, rows, cols, k, th, res);
  else fwd_typed<c10::Half>(vec, act, mode, gate, up, sg, su, out, out_sel, slot, lang, num_langs, oz, sum, rows, cols, k, th, res);
}

void lape_emu_bwd(int dtype, int vec, int act, int split, const void* go, const void* gos,
                  const void* gate, const void* up, int64_t sgo, int64_t sg, int64_t su, void* gg,
                  void* gu, void* ggs, void* gus, void* os, const int32_t* slot, int64_t rows,
                  int64_t cols, int64_t k, int th, int64_t res) {
  if (dtype == 0) bwd_typed<float>(vec, act, split, go, gos, gate, up, sgo, sg, su, gg, gu, ggs, gus, os, slot, rows, cols, k, th, res);
  else if (dtype == 1) bwd_typed<c10::BFloat16>(vec, act, split, go, gos, gate, up, sgo, sg, su, gg, gu, ggs, gus, os, slot, rows, cols, k, th, res);
  else bwd_typed<c10::Half>(vec, act, split, go, gos, gate, up, sgo, sg, su, gg, gu, ggs, gus, os, slot, rows, cols, k, th, res);
}

void lape_emu_plan(int64_t rows, int64_t cols, int vec, int threads, int64_t resident, int64_t* out) {
  const Plan pl = make_plan(rows, cols, vec, threads, resident);
  out[0] = pl.col_groups; out[1] = pl.grid_x; out[2] = pl.chunks; out[3] = pl.rows_per_chunk;
}

int lape_emu_vector_ok(const void* ptr, int64_t rows, int64_t row_stride, int elem_size, int vec) {
  return vector_ok(ptr, rows, row_stride, elem_size, vec) ? 1 : 0;
}

}  // extern "C"
"""


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The .cuh kernel bodies compiled for the host (ctypes library)."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to emulate the CUDA kernels on the CPU")
    from torch.utils.cpp_extension import include_paths

    d = tmp_path_factory.mktemp("cuda_emu")
    src = d / "harness.cpp"
    src.write_text(HARNESS)
    lib = d / "libemu.so"
    cmd = [cxx, "-O1", "-std=c++20", "-shared", "-fPIC", "-w", f"-I{CUDA_DIR}"]
    cmd += [f"-I{p}" for p in include_paths()] + [str(src), "-o", str(lib)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    h = ctypes.CDLL(str(lib))
    i64, i32, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    h.lape_emu_fwd.argtypes = [i32] * 4 + [vp, vp, i64, i64] + [vp] * 4 + [i64, vp, vp, i64, i64, i64, i32, i64]
    h.lape_emu_bwd.argtypes = [i32] * 4 + [vp] * 4 + [i64] * 3 + [vp] * 6 + [i64, i64, i64, i32, i64]
    h.lape_emu_plan.argtypes = [i64, i64, i32, i32, i64, vp]
    h.lape_emu_vector_ok.argtypes = [vp, i64, i64, i32, i32]
    h.lape_emu_vector_ok.restype = ctypes.c_int
    return h


def _ptr(t):
    return None if t is None else t.data_ptr()


def _rs(t):
    return 0 if t.shape[0] <= 1 else t.stride(0)


def _vec_possible(h, I, tensors):
    """The .cu's rule: 16-byte vectors when I % VEC == 0 and every operand is aligned."""
    es = tensors[0].element_size()
    v = 16 // es
    return I % v == 0 and all(h.lape_emu_vector_ok(_ptr(t), t.shape[0], _rs(t), es, v) for t in tensors)


def _slot(sel, I):
    slot = torch.full((I,), -1, dtype=torch.int32)
    slot[sel] = torch.arange(sel.numel(), dtype=torch.int32)
    return slot


def emu_forward(h, gate, up, activation, mode, *, sel=None, token_lang=None, num_langs=1,
                vec=True, threads=32, resident=1):
    """Allocate like act_mul_cuda.cu and run the emulated forward kernel (mode 0/1/2 = plain/count/split)."""
    T, I = gate.shape
    out = torch.empty(T, I, dtype=gate.dtype)
    k = 0 if sel is None else sel.numel()
    out_sel = torch.empty(T, k, dtype=gate.dtype)
    oz = torch.zeros(num_langs, I, dtype=torch.int64)
    sums = torch.zeros(num_langs, I, dtype=torch.float64)
    slot = _slot(sel, I) if sel is not None else None
    vec = vec and _vec_possible(h, I, [gate, up, out])
    h.lape_emu_fwd(DTYPE_ID[gate.dtype], int(vec), ACT_ID[activation], mode, _ptr(gate), _ptr(up), _rs(gate), _rs(up),
                   _ptr(out), _ptr(out_sel), _ptr(slot), _ptr(token_lang), num_langs, _ptr(oz), _ptr(sums),
                   T, I, k, threads, resident)
    return out, out_sel, oz, sums, vec


def emu_backward(h, grad_out, gate, up, activation, *, grad_out_sel=None, sel=None, vec=True, threads=32, resident=1):
    T, I = gate.shape
    dt = gate.dtype
    gg, gu = torch.empty(T, I, dtype=dt), torch.empty(T, I, dtype=dt)
    k = 0 if sel is None else sel.numel()
    sel_outs = [torch.empty(T, k, dtype=dt) for _ in range(3)]
    slot = _slot(sel, I) if sel is not None else None
    gos = grad_out_sel.contiguous() if grad_out_sel is not None else None
    vec = vec and _vec_possible(h, I, [grad_out, gate, up, gg, gu])
    h.lape_emu_bwd(DTYPE_ID[dt], int(vec), ACT_ID[activation], int(sel is not None), _ptr(grad_out), _ptr(gos),
                   _ptr(gate), _ptr(up), _rs(grad_out), _rs(gate), _rs(up), _ptr(gg), _ptr(gu),
                   *[_ptr(t) for t in sel_outs], _ptr(slot), T, I, k, threads, resident)
    return gg, gu, sel_outs, vec


# Grid plans: one chunk per column block (long row loops, few flushes) and as many chunks as
# possible (kRows rows each: many flushes, partial row groups).
PLANS = {"one_chunk": 1, "many_chunks": 1 << 30}


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("vec", [True, False], ids=["vec", "scalar"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
def test_emulated_forward_ops(emu, activation, dtype, vec, plan):
    T, I = 37, 48
    gate, up = gate_up_halves(T, I, dtype)
    # plain
    out, _, _, _, used_vec = emu_forward(emu, gate, up, activation, 0, vec=vec, resident=PLANS[plan])
    assert used_vec == vec
    check_close(out, ref.act_mul(gate, up, activation), fwd_scale(gate, up))
    # count, per-token languages with runs, padding and out-of-range ids
    lang = runs_lang(T, 3)
    out, _, oz, sums, _ = emu_forward(emu, gate, up, activation, 1, token_lang=lang, num_langs=3, vec=vec,
                                      resident=PLANS[plan])
    check_count((out, oz, sums), gate, up, activation, lang, 3)
    # count without token_lang: everything is language 0
    out, _, oz, sums, _ = emu_forward(emu, gate, up, activation, 1, num_langs=2, vec=vec, resident=PLANS[plan])
    check_count((out, oz, sums), gate, up, activation, None, 2)
    # split
    sel = sorted_sel(I, 11)
    out, out_sel, _, _, _ = emu_forward(emu, gate, up, activation, 2, sel=sel, vec=vec, resident=PLANS[plan])
    check_split((out, out_sel), gate, up, activation, sel)


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("vec", [True, False], ids=["vec", "scalar"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
def test_emulated_backward_ops(emu, activation, dtype, vec, plan):
    T, I = 29, 40
    gate, up = gate_up_halves(T, I, dtype, seed=1)
    grad_out = (torch.randn(T, I, generator=torch.Generator().manual_seed(2))).to(dtype)
    gg, gu, _, used_vec = emu_backward(emu, grad_out, gate, up, activation, vec=vec, resident=PLANS[plan])
    assert used_vec == vec
    check_backward((gg, gu), grad_out, gate, up, activation)
    for k in (0, 7, I):
        sel = sorted_sel(I, k, seed=k)
        gos = torch.randn(T, k, generator=torch.Generator().manual_seed(3)).to(dtype)
        gg, gu, (ggs, gus, osel), _ = emu_backward(emu, grad_out, gate, up, activation, grad_out_sel=gos, sel=sel,
                                                   vec=vec, resident=PLANS[plan])
        check_backward_split((gg, gu, ggs, gus, osel), grad_out, gos, gate, up, activation, sel)


def test_emulated_unaligned_views_use_scalar_path(emu):
    """A view starting one element into its storage cannot use 16-byte vectors; results stay right."""
    T, I = 9, 16
    buf = torch.randn(T, 2 * I + 1).to(torch.bfloat16)
    gate, up = buf[:, 1 : I + 1], buf[:, I + 1 :]
    out, _, _, _, used_vec = emu_forward(emu, gate, up, "silu", 0, vec=True)
    assert not used_vec
    check_close(out, ref.act_mul(gate, up, "silu"), fwd_scale(gate, up))
    # odd I: no vectors either
    gate, up = gate_up_halves(T, 13, torch.float32)
    out, _, _, _, used_vec = emu_forward(emu, gate, up, "gelu", 0, vec=True)
    assert not used_vec
    check_close(out, ref.act_mul(gate, up, "gelu"), fwd_scale(gate, up))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
def test_emulated_count_special_values(emu, activation, dtype):
    """Zeros, signed zeros, tiny, huge and non-finite gates: counts exact, NaN sums propagate."""
    vals = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-3, -1e-3, 5.0, -5.0, 30.0, -30.0, 100.0, -100.0,
                         float("inf"), float("-inf"), float("nan"), 1.0])
    gate = vals.repeat(6, 2).to(dtype)  # [6, 32]
    up = torch.ones_like(gate)
    lang = torch.tensor([0, 0, 1, -1, 1, 0])
    for vec in (True, False):
        out, _, oz, sums, _ = emu_forward(emu, gate, up, activation, 1, token_lang=lang, num_langs=2, vec=vec)
        check_count((out, oz, sums), gate, up, activation, lang, 2)


def test_emulated_count_many_languages_alternating(emu):
    """A language change on every row (worst case for the run-length flushing) stays exact."""
    T, I, L = 64, 24, 5
    gate, up = gate_up_halves(T, I, torch.float32, seed=4)
    lang = torch.arange(T) % (L + 1) - 1  # -1, 0, 1, ..., L-1, -1, ...
    for resident in PLANS.values():
        out, _, oz, sums, _ = emu_forward(emu, gate, up, "silu", 1, token_lang=lang, num_langs=L, resident=resident)
        check_count((out, oz, sums), gate, up, "silu", lang, L)


@pytest.mark.parametrize("T", [1, 3, 4, 5, 17, 4096, 16384, 300000])
@pytest.mark.parametrize("I", [1, 7, 8, 14336])
@pytest.mark.parametrize("resident", [1, 132 * 4, 132 * 16, 1 << 40])
def test_plan_covers_every_row_and_column_once(emu, T, I, resident):
    for vec in (1, 8):
        out = (ctypes.c_int64 * 4)()
        emu.lape_emu_plan(T, I, vec, 128, resident, ctypes.addressof(out))
        col_groups, grid_x, chunks, rows_per_chunk = list(out)
        assert col_groups * vec >= I and (col_groups - 1) * vec < I
        assert grid_x * 128 >= col_groups and (grid_x - 1) * 128 < col_groups
        assert 1 <= chunks <= 65535
        assert chunks * rows_per_chunk >= T and (chunks - 1) * rows_per_chunk < T
        assert chunks <= max(1, -(-T // 4))  # about kRows (4) rows per chunk at least


# ========================================================================== on CUDA ====

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def cuda_backend():
    """torch.ops.lape_kernels.* on the CUDA C++ kernels; restores the previous backend."""
    ops = pytest.importorskip("lape_kernels.kernels.ops")
    if not ops._HAS_CUDA_CPP:
        pytest.skip("the CUDA C++ kernels are not compiled in")
    previous = ops.current_cuda_backend()
    ops.use_cuda_backend("cuda")
    yield torch.ops.lape_kernels
    ops.use_cuda_backend(previous)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("I", [48, 13], ids=["vec", "scalar"])
def test_cuda_ops_match_reference(cuda_backend, activation, dtype, I):
    ops = cuda_backend
    T = 75
    gate, up = gate_up_halves(T, I, dtype, device="cuda")
    check_close(ops.act_mul(gate, up, activation), ref.act_mul(gate, up, activation), fwd_scale(gate, up))

    lang = runs_lang(T, 3).cuda()
    check_count(ops.act_mul_count(gate, up, activation, lang, 3), gate, up, activation, lang, 3)
    check_count(ops.act_mul_count(gate, up, activation, None, 1), gate, up, activation, None, 1)

    grad_out = torch.randn(T, I, device="cuda").to(dtype)
    check_backward(ops.act_mul_backward(grad_out, gate, up, activation), grad_out, gate, up, activation)

    for k in (0, 5, I):
        sel = sorted_sel(I, k).cuda()
        check_split(ops.act_mul_split(gate, up, activation, sel), gate, up, activation, sel)
        gos = torch.randn(T, k, device="cuda").to(dtype)
        check_backward_split(ops.act_mul_backward_split(grad_out, gos, gate, up, activation, sel),
                             grad_out, gos, gate, up, activation, sel)


@cuda_only
def test_cuda_count_exact_at_llama_8b_size(cuda_backend):
    """T=4096 tokens x I=14336 (Llama-3.1-8B MLP), bf16, 4 languages: counts bit-exact."""
    ops = cuda_backend
    T, I = 4096, 14336
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate = torch.randn(T, I, device="cuda", generator=gen, dtype=torch.bfloat16)
    up = torch.randn(T, I, device="cuda", generator=gen, dtype=torch.bfloat16)
    lang = torch.arange(T, device="cuda") // 512 % 5 - 1  # runs of 512 tokens, one padding run
    check_count(ops.act_mul_count(gate, up, "silu", lang, 4), gate, up, "silu", lang, 4)


@cuda_only
def test_cuda_empty_and_degenerate_shapes(cuda_backend):
    ops = cuda_backend
    for T, I in ((0, 16), (5, 0), (0, 0), (1, 1)):
        gate = torch.randn(T, I, device="cuda")
        up = torch.randn(T, I, device="cuda")
        check_close(ops.act_mul(gate, up, "silu"), ref.act_mul(gate, up, "silu"), fwd_scale(gate, up))
        check_count(ops.act_mul_count(gate, up, "gelu", None, 2), gate, up, "gelu", None, 2)
        sel = torch.arange(min(I, 1), device="cuda")
        check_split(ops.act_mul_split(gate, up, "silu", sel), gate, up, "silu", sel)
        grad_out = torch.randn(T, I, device="cuda")
        gos = torch.randn(T, sel.numel(), device="cuda")
        check_backward(ops.act_mul_backward(grad_out, gate, up, "gelu"), grad_out, gate, up, "gelu")
        check_backward_split(ops.act_mul_backward_split(grad_out, gos, gate, up, "gelu_tanh", sel),
                             grad_out, gos, gate, up, "gelu_tanh", sel)


@cuda_only
def test_cuda_argument_checks(cuda_backend):
    ops = cuda_backend
    gate = torch.randn(4, 8, device="cuda")
    up = torch.randn(4, 8, device="cuda")
    _check_errors(ops, gate, up)


def _check_errors(ops, gate, up):
    """Bad arguments raise ValueError naming the argument (shared with test_triton's GPU run)."""
    T, I = gate.shape
    with pytest.raises(ValueError, match="activation"):
        ops.act_mul(gate, up, "relu")
    with pytest.raises(ValueError, match="gate"):
        ops.act_mul(gate.double(), up, "silu")
    with pytest.raises(ValueError, match="same shape"):
        ops.act_mul(gate, up[:, :-1], "silu")
    with pytest.raises(ValueError, match="same dtype"):
        ops.act_mul(gate, up.half(), "silu")
    with pytest.raises(ValueError, match="2-D"):
        ops.act_mul(gate[0], up[0], "silu")
    with pytest.raises(ValueError, match="same device"):
        ops.act_mul(gate, up.cpu(), "silu")
    with pytest.raises(ValueError, match="contiguous last dimension"):
        ops.act_mul(gate.t().contiguous().t(), up, "silu")
    with pytest.raises(ValueError, match="num_langs"):
        ops.act_mul_count(gate, up, "silu", None, 0)
    with pytest.raises(ValueError, match="token_lang"):
        ops.act_mul_count(gate, up, "silu", torch.zeros(T, dtype=torch.int32, device=gate.device), 1)
    with pytest.raises(ValueError, match="token_lang"):
        ops.act_mul_count(gate, up, "silu", torch.zeros(T + 1, dtype=torch.int64, device=gate.device), 1)
    with pytest.raises(ValueError, match="token_lang"):
        ops.act_mul_count(gate, up, "silu", torch.zeros(T, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="sel"):
        ops.act_mul_split(gate, up, "silu", torch.tensor([0, 1], dtype=torch.int32, device=gate.device))
    for bad in ([2, 1], [1, 1], [-1, 2], [0, I]):
        with pytest.raises(ValueError, match="sel"):
            ops.act_mul_split(gate, up, "silu", torch.tensor(bad, device=gate.device))
    sel = torch.tensor([1, 3], device=gate.device)
    with pytest.raises(ValueError, match="grad_out_sel"):
        ops.act_mul_backward_split(gate, torch.zeros(T, 3, device=gate.device), gate, up, "silu", sel)
    with pytest.raises(ValueError, match="grad_out_sel"):
        ops.act_mul_backward_split(gate, torch.zeros(T, 2, device=gate.device, dtype=torch.half), gate, up,
                                   "silu", sel)
    with pytest.raises(ValueError, match="grad_out"):
        ops.act_mul_backward(gate[:, :-1], gate, up, "silu")


@cuda_only
def test_cuda_and_triton_backends_agree_and_switch(cuda_backend):
    """use_cuda_backend switches the kernels behind torch.ops; both give the reference's counts."""
    from lape_kernels.kernels import ops as lk_ops

    T, I = 300, 1000
    gate, up = gate_up_halves(T, I, torch.bfloat16, device="cuda")
    lang = runs_lang(T, 4).cuda()
    sel = sorted_sel(I, 37).cuda()
    grad_out = torch.randn(T, I, device="cuda", dtype=torch.bfloat16)
    gos = torch.randn(T, 37, device="cuda", dtype=torch.bfloat16)
    results = {}
    for backend in ("cuda", "triton", "cuda"):
        assert lk_ops.use_cuda_backend(backend) == backend
        assert lk_ops.current_cuda_backend() == backend
        results[backend] = (
            torch.ops.lape_kernels.act_mul_count(gate, up, "gelu_tanh", lang, 4),
            torch.ops.lape_kernels.act_mul_split(gate, up, "silu", sel),
            torch.ops.lape_kernels.act_mul_backward_split(grad_out, gos, gate, up, "gelu", sel),
        )
    for backend, (count, split, bsplit) in results.items():
        check_count(count, gate, up, "gelu_tanh", lang, 4)
        check_split(split, gate, up, "silu", sel)
        check_backward_split(bsplit, grad_out, gos, gate, up, "gelu", sel)
