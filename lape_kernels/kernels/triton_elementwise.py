"""Triton kernels for the ``lape_kernels`` ops (the CUDA dispatch key's Triton backend).

Each public function has the name and signature of the op it implements (see
docs/ARCHITECTURE.md), validates its arguments with checks.py (the one error model of every
backend), allocates the outputs and launches one kernel.
``lape_kernels.ops`` registers them for the CUDA dispatch key.

Design (why it looks like this):
- One pass over memory. Programs own a block of columns and loop over a contiguous range of
  rows, so per-column state (the selected-column slot map, the language counters) lives in
  registers for the whole range.
- All arithmetic is float32; loads are upcast at once and results rounded once at the store.
  That also keeps ``TRITON_INTERPRET=1`` (CPU) exact apart from its bf16 store, which
  truncates instead of rounding to nearest.
- Counting: token languages come in long runs, so a program accumulates counts (int32) and
  sums (float64) of the current language elementwise over its tiles and reduces + flushes them
  with one atomic per column only when the language changes and at the end. Tiles that mix
  languages fall back to a per-language reduction with atomics.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import checks

__all__ = ["act_mul", "act_mul_count", "act_mul_backward", "act_mul_split", "act_mul_backward_split"]

_ACT_ID = {"silu": 0, "gelu_tanh": 1, "gelu": 2}


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _tanh(x):
    """tanh without overflow: sign(x) * (1 - 2e / (1 + e)), e = exp(-2|x|) in (0, 1].

    Near |t| = 1 (where gelu_tanh's 1 + t cancels) the last step is a single rounding, so t is
    within about an ulp of the correctly rounded value; near 0 the absolute error is ~1 ulp of
    1, which is all that 1 + t and 1 - t^2 need. (The interpreter has no libdevice tanh.)
    """
    e = tl.exp(-2.0 * tl.abs(x))
    t = 1.0 - 2.0 * e / (1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:
        a = g * tl.sigmoid(g)
    elif ACT == 1:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (1.0 + _tanh(inner))
    else:
        a = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    return a


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    if ACT == 0:
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = _tanh(inner)
        a = 0.5 * g * (1.0 + t)
        d_inner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * d_inner
    else:
        e = 1.0 + tl.erf(g * 0.7071067811865476)
        a = 0.5 * g * e
        da = 0.5 * e + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    return a, da


@triton.jit
def _tile_langs(lang_ptr, rows, rmask, num_langs, HAS_LANG: tl.constexpr):
    """(lang int32, valid, lmin, lmax) of a tile's rows: ids outside [0, num_langs) are not
    counted (-1). The range check runs on the int64 id, so 2^32 + 1 cannot wrap into range.
    No valid row: lmin = num_langs > lmax = -1."""
    if HAS_LANG:
        lang64 = tl.load(lang_ptr + rows, mask=rmask, other=-1)
        valid = (lang64 >= 0) & (lang64 < num_langs)
        lang = tl.where(valid, lang64, -1).to(tl.int32)
    else:  # no token_lang: every row is language 0
        valid = rmask
        lang = tl.where(rmask, 0, -1)
    lmin = tl.min(tl.where(valid, lang, num_langs), axis=0)
    lmax = tl.max(tl.where(valid, lang, -1), axis=0)
    return lang, valid, lmin, lmax


@triton.jit
def _flush(oz_ptr, sum_ptr, k, I, cols, cmask, acc_c, acc_s):
    """Add one language's per-column count/sum partials into over_zero[k] / act_sum[k]."""
    c = tl.sum(acc_c, axis=0)
    s = tl.sum(acc_s, axis=0)
    base = tl.cast(k, tl.int64) * I
    tl.atomic_add(oz_ptr + base + cols, c.to(tl.int64), mask=cmask & (c != 0), sem="relaxed")
    tl.atomic_add(sum_ptr + base + cols, s, mask=cmask & (s != 0.0), sem="relaxed")


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _fwd_kernel(
    gate_ptr, up_ptr, out_ptr, sel_out_ptr, slot_ptr, lang_ptr, oz_ptr, sum_ptr,
    T, I, K, num_langs, stride_g, stride_u, rows_per_prog,
    ACT: tl.constexpr, COUNT: tl.constexpr, SPLIT: tl.constexpr, HAS_LANG: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """out = act(gate) * up over a column block and a row range; optionally count / split."""
    pid_i = tl.program_id(0)
    pid_t = tl.program_id(1)
    cols = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    cmask = cols < I
    row_lo = pid_t * rows_per_prog
    row_hi = tl.minimum(row_lo + rows_per_prog, T)
    if SPLIT:
        slot = tl.load(slot_ptr + cols, mask=cmask, other=-1)
        selected = slot >= 0
    if COUNT:
        cur = pid_t * 0 - 1  # language being accumulated (-1: none yet)
        acc_c = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.int32)
        acc_s = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float64)
    for rb in range(row_lo, row_hi, BLOCK_T):
        rows = rb + tl.arange(0, BLOCK_T)
        rmask = rows < row_hi
        r64 = rows.to(tl.int64)
        m2 = rmask[:, None] & cmask[None, :]
        g = tl.load(gate_ptr + r64[:, None] * stride_g + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + r64[:, None] * stride_u + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        a = _act(g, ACT)
        h = a * u
        if SPLIT:
            sel_mask = rmask[:, None] & selected[None, :]
            tl.store(sel_out_ptr + r64[:, None] * K + slot[None, :],
                     h.to(sel_out_ptr.dtype.element_ty), mask=sel_mask)
            h = tl.where(selected[None, :], 0.0, h)
        tl.store(out_ptr + r64[:, None] * I + cols[None, :], h.to(out_ptr.dtype.element_ty), mask=m2)
        if COUNT:
            lang, valid, lmin, lmax = _tile_langs(lang_ptr, rows, rmask, num_langs, HAS_LANG)
            pos = a > 0.0
            if lmin == lmax:
                # The whole tile is one language (rows of other ids are not counted).
                if lmin != cur:
                    if cur >= 0:
                        _flush(oz_ptr, sum_ptr, cur, I, cols, cmask, acc_c, acc_s)
                    acc_c = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.int32)
                    acc_s = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float64)
                    cur = lmin
                vm = valid[:, None] & cmask[None, :]
                acc_c += (vm & pos).to(tl.int32)
                acc_s += tl.where(vm, a, 0.0).to(tl.float64)
            elif lmax >= 0:
                # Mixed tile: reduce each language present and add it at once.
                for k in range(lmin, lmax + 1):
                    km = (lang == k)[:, None] & cmask[None, :]
                    _flush(oz_ptr, sum_ptr, k, I, cols, cmask,
                           (km & pos).to(tl.int32), tl.where(km, a, 0.0).to(tl.float64))
    if COUNT:
        if cur >= 0:
            _flush(oz_ptr, sum_ptr, cur, I, cols, cmask, acc_c, acc_s)


@triton.jit
def _bwd_kernel(
    go_ptr, gos_ptr, gate_ptr, up_ptr, gg_ptr, gu_ptr, ggs_ptr, gus_ptr, os_ptr, slot_ptr,
    T, I, K, stride_go, stride_g, stride_u, rows_per_prog,
    ACT: tl.constexpr, SPLIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """grad_gate = dh * up * act'(gate), grad_up = dh * act(gate); optionally split by sel."""
    pid_i = tl.program_id(0)
    pid_t = tl.program_id(1)
    cols = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    cmask = cols < I
    row_lo = pid_t * rows_per_prog
    row_hi = tl.minimum(row_lo + rows_per_prog, T)
    if SPLIT:
        slot = tl.load(slot_ptr + cols, mask=cmask, other=-1)
        selected = slot >= 0
    for rb in range(row_lo, row_hi, BLOCK_T):
        rows = rb + tl.arange(0, BLOCK_T)
        rmask = rows < row_hi
        r64 = rows.to(tl.int64)
        m2 = rmask[:, None] & cmask[None, :]
        dh = tl.load(go_ptr + r64[:, None] * stride_go + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + r64[:, None] * stride_g + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + r64[:, None] * stride_u + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        if SPLIT:
            sel_mask = rmask[:, None] & selected[None, :]
            sel_off = r64[:, None] * K + slot[None, :]
            dh_sel = tl.load(gos_ptr + sel_off, mask=sel_mask, other=0.0).to(tl.float32)
            dh = tl.where(selected[None, :], dh_sel, dh)
        a, da = _act_and_grad(g, ACT)
        ggv = dh * u * da
        guv = dh * a
        if SPLIT:
            tl.store(ggs_ptr + sel_off, ggv.to(ggs_ptr.dtype.element_ty), mask=sel_mask)
            tl.store(gus_ptr + sel_off, guv.to(gus_ptr.dtype.element_ty), mask=sel_mask)
            tl.store(os_ptr + sel_off, (a * u).to(os_ptr.dtype.element_ty), mask=sel_mask)
            ggv = tl.where(selected[None, :], 0.0, ggv)
            guv = tl.where(selected[None, :], 0.0, guv)
        out_off = r64[:, None] * I + cols[None, :]
        tl.store(gg_ptr + out_off, ggv.to(gg_ptr.dtype.element_ty), mask=m2)
        tl.store(gu_ptr + out_off, guv.to(gu_ptr.dtype.element_ty), mask=m2)


# ----------------------------------------------------------------------------- launch helpers

# (BLOCK_T, BLOCK_I, num_warps) per kernel kind. Counting keeps a [BLOCK_T, BLOCK_I] int32 +
# float64 accumulator per program, so it uses shorter tiles. (benchmarks/gpu_kernels.py --sweep
# times alternatives.)
CONFIGS = {"fwd": (32, 128, 4), "count": (16, 128, 8), "bwd": (16, 128, 8)}
# Programs per SM the grid aims for (row ranges per column block follow from it).
PROGS_PER_SM = 8
# Row-range programs per column block when running under the CPU interpreter (tests override).
_INTERPRET_ROW_PROGS = 2
_sm_count_cache: dict = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_count_cache:
        _sm_count_cache[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_count_cache[idx]


def _grid(T: int, I: int, device: torch.device, block_t: int, block_i: int, row_progs: Optional[int]):
    """(grid, rows_per_prog): column blocks x row ranges; rows_per_prog is a multiple of block_t."""
    col_blocks = triton.cdiv(I, block_i)
    row_blocks = triton.cdiv(T, block_t)
    if row_progs is None:
        if device.type == "cuda":
            target = _sm_count(device) * PROGS_PER_SM
            row_progs = triton.cdiv(target, col_blocks)
        else:
            row_progs = _INTERPRET_ROW_PROGS
    row_progs = max(1, min(int(row_progs), row_blocks))
    rows_per_prog = triton.cdiv(row_blocks, row_progs) * block_t
    row_progs = triton.cdiv(T, rows_per_prog)
    return (col_blocks, row_progs), rows_per_prog


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """Gradients may come in any layout: copy only when the last dim is not contiguous."""
    return t.contiguous() if t.shape[1] > 1 and t.stride(1) != 1 else t


def _device_ctx(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    import contextlib

    return contextlib.nullcontext()


def _slot_map(sel: torch.Tensor, I: int) -> torch.Tensor:
    """int32 [I]: position of column i in sel, or -1."""
    k = sel.shape[0]
    slot = torch.full((I,), -1, dtype=torch.int32, device=sel.device)
    slot[sel] = torch.arange(k, dtype=torch.int32, device=sel.device)
    return slot


# ----------------------------------------------------------------------------- implementations
# The *_impl functions take optional tile / grid overrides so the tests can exercise
# several programs and partial tiles with small tensors.

def _fwd_impl(gate, up, activation, *, count=False, token_lang=None, num_langs=1, sel=None,
              block_t=None, block_i=None, row_progs=None):
    T, I = gate.shape
    device = gate.device
    out = torch.empty((T, I), dtype=gate.dtype, device=device)
    split = sel is not None
    k = sel.shape[0] if split else 0
    out_sel = torch.empty((T, k), dtype=gate.dtype, device=device) if split else None
    over_zero = act_sum = None
    if count:
        over_zero = torch.zeros((num_langs, I), dtype=torch.int64, device=device)
        act_sum = torch.zeros((num_langs, I), dtype=torch.float64, device=device)
    if T > 0 and I > 0:
        slot = _slot_map(sel, I) if split else None
        if split and k == 0:
            split, slot = False, None  # nothing selected: plain act_mul
        bt, bi, nw = CONFIGS["count" if count else "fwd"]
        bt, bi = block_t or bt, block_i or bi
        grid, rows_per_prog = _grid(T, I, device, bt, bi, row_progs)
        has_lang = token_lang is not None
        with _device_ctx(device):
            _fwd_kernel[grid](
                gate, up, out,
                out_sel if split else out,
                slot if split else out,
                token_lang if has_lang else out,
                over_zero if count else out,
                act_sum if count else out,
                T, I, k, num_langs, gate.stride(0), up.stride(0), rows_per_prog,
                ACT=_ACT_ID[activation], COUNT=count, SPLIT=split, HAS_LANG=has_lang,
                BLOCK_T=bt, BLOCK_I=bi, num_warps=nw,
            )
    return out, out_sel, over_zero, act_sum


def _bwd_impl(grad_out, gate, up, activation, *, grad_out_sel=None, sel=None,
              block_t=None, block_i=None, row_progs=None):
    T, I = gate.shape
    device = gate.device
    dt = gate.dtype
    grad_gate = torch.empty((T, I), dtype=dt, device=device)
    grad_up = torch.empty((T, I), dtype=dt, device=device)
    split = sel is not None
    k = sel.shape[0] if split else 0
    sel_outs = tuple(torch.empty((T, k), dtype=dt, device=device) for _ in range(3)) if split else None
    if T > 0 and I > 0:
        slot = _slot_map(sel, I) if split else None
        if split and k == 0:
            split, slot = False, None
        gos = grad_out_sel.contiguous() if split else None
        grad_out = _rows_view(grad_out)
        bt, bi, nw = CONFIGS["bwd"]
        bt, bi = block_t or bt, block_i or bi
        grid, rows_per_prog = _grid(T, I, device, bt, bi, row_progs)
        d = grad_gate  # placeholder for pointers the kernel does not use
        with _device_ctx(device):
            _bwd_kernel[grid](
                grad_out, gos if split else d, gate, up, grad_gate, grad_up,
                sel_outs[0] if split else d, sel_outs[1] if split else d, sel_outs[2] if split else d,
                slot if split else d,
                T, I, k, grad_out.stride(0), gate.stride(0), up.stride(0), rows_per_prog,
                ACT=_ACT_ID[activation], SPLIT=split, BLOCK_T=bt, BLOCK_I=bi, num_warps=nw,
            )
    return grad_gate, grad_up, sel_outs


# ----------------------------------------------------------------------------- public ops

def act_mul(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """out = act(gate) * up."""
    checks.act_mul_args(gate, up, activation)
    return _fwd_impl(gate, up, activation)[0]


def act_mul_count(gate: torch.Tensor, up: torch.Tensor, activation: str,
                  token_lang: Optional[torch.Tensor], num_langs: int):
    """(out, over_zero int64 [L, I], act_sum float64 [L, I]) in one pass over gate/up."""
    checks.act_mul_count_args(gate, up, activation, token_lang, num_langs)
    if token_lang is not None:
        token_lang = token_lang.contiguous()
    out, _, over_zero, act_sum = _fwd_impl(gate, up, activation, count=True,
                                           token_lang=token_lang, num_langs=int(num_langs))
    return out, over_zero, act_sum


def act_mul_backward(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str):
    """(grad_gate, grad_up) of out = act(gate) * up."""
    checks.act_mul_backward_args(grad_out, gate, up, activation)
    grad_gate, grad_up, _ = _bwd_impl(grad_out, gate, up, activation)
    return grad_gate, grad_up


def act_mul_split(gate: torch.Tensor, up: torch.Tensor, activation: str, sel: torch.Tensor):
    """(out with columns sel zeroed, out[:, sel]) of h = act(gate) * up."""
    checks.act_mul_split_args(gate, up, activation, sel)
    out, out_sel, _, _ = _fwd_impl(gate, up, activation, sel=sel)
    return out, out_sel


def act_mul_backward_split(grad_out: torch.Tensor, grad_out_sel: torch.Tensor, gate: torch.Tensor,
                           up: torch.Tensor, activation: str, sel: torch.Tensor):
    """(grad_gate, grad_up, grad_gate_sel, grad_up_sel, out_sel); see docs/ARCHITECTURE.md."""
    checks.act_mul_backward_split_args(grad_out, grad_out_sel, gate, up, activation, sel)
    grad_gate, grad_up, sel_outs = _bwd_impl(grad_out, gate, up, activation,
                                             grad_out_sel=grad_out_sel, sel=sel)
    return (grad_gate, grad_up) + sel_outs
