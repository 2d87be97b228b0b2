"""Triton kernels for the ``lape_kernels`` ops (the CUDA dispatch key's Triton backend).

Each public function has the name and signature of the op it implements (see
docs/ARCHITECTURE.md), validates its arguments with checks.py (the one error model of every
backend), allocates the outputs and launches one kernel. ``lape_kernels.ops`` registers them for
the CUDA dispatch key.

Design (why it looks like this):
- One pass over memory. Programs own a block of columns and loop over a contiguous range of
  rows, so per-column state (which columns are selected, the language counters) lives in
  registers for the whole range.
- The rounding points of the Hugging Face MLP the ops replace (reference.py): a = act(gate) in
  fp32 with ATen's formulas, rounded to the dtype; out = a * up rounded again; the backward as
  autograd of ``act(gate) * up`` computes it (ga = round(dh * up) goes into act'). The math
  library is the GPU's (libdevice exp/tanh/erf), so values may differ from ATen's CPU ones in
  the last fp32 bit before rounding.
- bf16 goes in and out through its bits (load: << 16; store: round to nearest even on the int32
  bits): exact on a GPU and under the CPU interpreter alike (the interpreter's own bf16
  conversions flush subnormals and truncate), so the interpreted tests check bf16 too.
- Counting: token languages come in long runs, so a program accumulates counts (int32) and
  sums (float64) of the current language elementwise over its tiles and reduces + flushes them
  with one atomic per column only when the language changes and at the end. Tiles that mix
  languages fall back to a per-language reduction with atomics. act_sum's float64 atomics make
  its last bits depend on the order programs finish (over_zero is exact integer arithmetic).
- Split ops: sel is sorted, so the selected columns of a column block are one contiguous range
  of slots [starts[b], starts[b + 1]). The full-width tile stores zeros there; the selected
  values are recomputed from the (L1-hot) rows as a [rows, SEL_BLOCK] tile and stored with
  contiguous stores into the [T, k] outputs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import checks

__all__ = ["act_mul", "act_mul_count", "act_mul_backward", "act_mul_split", "act_mul_backward_split"]

_ACT_ID = {"silu": 0, "gelu_tanh": 1, "gelu": 2}


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _load(ptrs, mask):
    """Elements as fp32 (bf16 through its bits: exact for subnormals, also when interpreted)."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        raw = tl.load(ptrs.to(tl.pointer_type(tl.int16)), mask=mask, other=0)
        return (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _bf16_bits(x):
    """fp32 -> the int32 bits of x rounded to nearest even bf16 (low 16 bits zero); NaN kept."""
    b = x.to(tl.int32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return tl.where(x != x, b | 0x400000, r)


@triton.jit
def _round(x, DT: tl.constexpr):
    """x rounded to the dtype DT (0 fp32, 1 bf16, 2 fp16), back in fp32: ATen's rounding of a
    value stored in that dtype."""
    if DT == 1:
        return _bf16_bits(x).to(tl.float32, bitcast=True)
    elif DT == 2:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _store(ptrs, x, mask):
    """Stores fp32 x rounded to nearest in the pointers' dtype (bf16 through its bits)."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        tl.store(ptrs.to(tl.pointer_type(tl.int16)), (_bf16_bits(x) >> 16).to(tl.int16), mask=mask)
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    if PRECISE:  # libdevice expf (the fast ex2.approx path loses ulps for large |x|)
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _tanh(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.tanh(x)
    else:
        # The interpreter has no tanh: sign(x) (1 - 2e / (1 + e)), e = exp(-2|x|) in (0, 1],
        # within about an ulp of the correctly rounded value.
        e = tl.exp(-2.0 * tl.abs(x))
        t = 1.0 - 2.0 * e / (1.0 + e)
        return tl.where(x < 0.0, -t, t)


@triton.jit
def _erf(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.erf(x)
    else:
        return tl.erf(x)


# ATen's constants (aten/src/ATen/native/cpu/Activation.cpp, Gelu.h), as fp32 literals below:
# kBeta = sqrt(2) * 2/sqrt(pi) * 0.5 = 0.7978845608028654, kKappa = 0.044715,
# kAlpha = 1/sqrt(2) = 0.7071067811865476, the pdf's 2/sqrt(pi) / sqrt(2) * 0.5 = 0.3989422804014327.


@triton.jit
def _act(g, ACT: tl.constexpr, PRECISE: tl.constexpr):
    """act(g) in fp32, with ATen's formulas (its vector path's order of operations)."""
    if ACT == 0:
        a = g / (1.0 + _exp(-g, PRECISE))
    elif ACT == 1:
        inner = 0.7978845608028654 * (g + 0.044715 * (g * g * g))
        a = 0.5 * g * (1.0 + _tanh(inner, PRECISE))
    else:
        a = g * 0.5 * (1.0 + _erf(g * 0.7071067811865476, PRECISE))
    return a


@triton.jit
def _act_backward(dy, x, ACT: tl.constexpr, PRECISE: tl.constexpr):
    """dy * act'(x) with ATen's silu_backward / gelu_backward formulas."""
    if ACT == 0:
        s = 1.0 / (1.0 + _exp(-x, PRECISE))
        d = dy * s * (1.0 + x * (1.0 - s))
    elif ACT == 1:
        x_sq = x * x
        t = _tanh(0.7978845608028654 * (x + 0.044715 * (x * x * x)), PRECISE)
        left = 0.5 * x
        right_derivative = left * (1.0 - t * t) * (0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x_sq))
        d = dy * (0.5 * (1.0 + t) + right_derivative)
    else:
        cdf = 0.5 * (1.0 + _erf(x * 0.7071067811865476, PRECISE))
        pdf = 0.3989422804014327 * _exp(x * x * -0.5, PRECISE)
        d = dy * (cdf + x * pdf)
    return d


@triton.jit
def _grads(dh, g, u, ACT: tl.constexpr, DT: tl.constexpr, PRECISE: tl.constexpr):
    """Autograd of round(act(g)) * u for the gradient dh: (grad_gate, grad_up, a) in fp32 (the
    gradients are rounded when stored)."""
    a = _round(_act(g, ACT, PRECISE), DT)
    ga = _round(dh * u, DT)
    return _act_backward(ga, g, ACT, PRECISE), dh * a, a


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


@triton.jit
def _program_tile(T, I, rows_per_prog, BLOCK_I: tl.constexpr):
    """This program's column block (cols, cmask) and row range [row_lo, row_hi)."""
    pid_i = tl.program_id(0)
    pid_t = tl.program_id(1)
    cols = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    row_lo = pid_t * rows_per_prog
    return pid_i, cols, cols < I, row_lo, tl.minimum(row_lo + rows_per_prog, T)


@triton.jit
def _row_tile(rb, row_hi, cmask, BLOCK_T: tl.constexpr):
    """Rows [rb, rb + BLOCK_T) of the range: (rows, rmask, int64 rows, 2-D mask)."""
    rows = rb + tl.arange(0, BLOCK_T)
    rmask = rows < row_hi
    return rows, rmask, rows.to(tl.int64), rmask[:, None] & cmask[None, :]


@triton.jit
def _block_selection(slot_ptr, start_ptr, pid_i, cols, cmask, K):
    """Which of the block's columns are selected (slots outside [0, K) count as not), and the
    block's range of slots [s_lo, s_hi) (sel is sorted: one contiguous range per block)."""
    slot = tl.load(slot_ptr + cols, mask=cmask, other=-1)
    return (slot >= 0) & (slot < K), tl.load(start_ptr + pid_i), tl.load(start_ptr + pid_i + 1)


@triton.jit
def _sel_tile(sel_ptr, j0, s_hi, r64, rmask, I, K, SEL_BLOCK: tl.constexpr):
    """Slots [j0, j0 + SEL_BLOCK) of the block's selected range: (their int32 columns, offsets
    r * K + slot into the [T, k] outputs, mask). Columns outside [0, I) are masked: a sel that
    was not checked (ops.sel_slots checks it once) can never make a load leave the row."""
    js = j0 + tl.arange(0, SEL_BLOCK)
    jm = (js >= 0) & (js < s_hi) & (js < K)
    scol = tl.load(sel_ptr + js, mask=jm, other=0)
    jm = jm & (scol >= 0) & (scol < I)
    return scol, r64[:, None] * K + js[None, :], rmask[:, None] & jm[None, :]


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _fwd_kernel(
    gate_ptr, up_ptr, out_ptr, sel_out_ptr, slot_ptr, sel_ptr, start_ptr, lang_ptr, oz_ptr, sum_ptr,
    T, I, K, num_langs, stride_g, stride_u, rows_per_prog,
    ACT: tl.constexpr, DT: tl.constexpr, PRECISE: tl.constexpr, COUNT: tl.constexpr, SPLIT: tl.constexpr,
    HAS_LANG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, SEL_BLOCK: tl.constexpr,
):
    """out = round(round(act(gate)) * up) over a column block and a row range; optionally
    count (over_zero / act_sum of the rounded act) or split by sel."""
    pid_i, cols, cmask, row_lo, row_hi = _program_tile(T, I, rows_per_prog, BLOCK_I)
    if SPLIT:
        selected, s_lo, s_hi = _block_selection(slot_ptr, start_ptr, pid_i, cols, cmask, K)
    if COUNT:
        cur = pid_i * 0 - 1  # language being accumulated (-1: none yet)
        acc_c = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.int32)
        acc_s = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float64)
    for rb in range(row_lo, row_hi, BLOCK_T):
        rows, rmask, r64, m2 = _row_tile(rb, row_hi, cmask, BLOCK_T)
        g = _load(gate_ptr + r64[:, None] * stride_g + cols[None, :], m2)
        u = _load(up_ptr + r64[:, None] * stride_u + cols[None, :], m2)
        a = _round(_act(g, ACT, PRECISE), DT)
        h = a * u
        if SPLIT:
            h = tl.where(selected[None, :], 0.0, h)
        _store(out_ptr + r64[:, None] * I + cols[None, :], h, m2)
        if SPLIT:
            for j0 in range(s_lo, s_hi, SEL_BLOCK):
                scol, offs, sm = _sel_tile(sel_ptr, j0, s_hi, r64, rmask, I, K, SEL_BLOCK)
                gs = _load(gate_ptr + r64[:, None] * stride_g + scol[None, :], sm)
                us = _load(up_ptr + r64[:, None] * stride_u + scol[None, :], sm)
                _store(sel_out_ptr + offs, _round(_act(gs, ACT, PRECISE), DT) * us, sm)
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
    go_ptr, gos_ptr, gate_ptr, up_ptr, gg_ptr, gu_ptr, ggs_ptr, gus_ptr, os_ptr, slot_ptr, sel_ptr, start_ptr,
    T, I, K, stride_go, stride_g, stride_u, rows_per_prog,
    ACT: tl.constexpr, DT: tl.constexpr, PRECISE: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, SEL_BLOCK: tl.constexpr,
):
    """grad_gate / grad_up of out = round(act(gate)) * up; with SPLIT the selected columns are
    zero in them and go, from grad_out_sel, to the [T, k] outputs (with out_sel)."""
    pid_i, cols, cmask, row_lo, row_hi = _program_tile(T, I, rows_per_prog, BLOCK_I)
    if SPLIT:
        selected, s_lo, s_hi = _block_selection(slot_ptr, start_ptr, pid_i, cols, cmask, K)
    for rb in range(row_lo, row_hi, BLOCK_T):
        rows, rmask, r64, m2 = _row_tile(rb, row_hi, cmask, BLOCK_T)
        dh = _load(go_ptr + r64[:, None] * stride_go + cols[None, :], m2)
        g = _load(gate_ptr + r64[:, None] * stride_g + cols[None, :], m2)
        u = _load(up_ptr + r64[:, None] * stride_u + cols[None, :], m2)
        ggv, guv, _ = _grads(dh, g, u, ACT, DT, PRECISE)
        if SPLIT:
            ggv = tl.where(selected[None, :], 0.0, ggv)
            guv = tl.where(selected[None, :], 0.0, guv)
        out_off = r64[:, None] * I + cols[None, :]
        _store(gg_ptr + out_off, ggv, m2)
        _store(gu_ptr + out_off, guv, m2)
        if SPLIT:
            for j0 in range(s_lo, s_hi, SEL_BLOCK):
                scol, offs, sm = _sel_tile(sel_ptr, j0, s_hi, r64, rmask, I, K, SEL_BLOCK)
                gs = _load(gate_ptr + r64[:, None] * stride_g + scol[None, :], sm)
                us = _load(up_ptr + r64[:, None] * stride_u + scol[None, :], sm)
                dhs = _load(gos_ptr + offs, sm)
                ggs, gus, a_s = _grads(dhs, gs, us, ACT, DT, PRECISE)
                _store(ggs_ptr + offs, ggs, sm)
                _store(gus_ptr + offs, gus, sm)
                _store(os_ptr + offs, a_s * us, sm)


# ----------------------------------------------------------------------------- launch helpers

# (BLOCK_T, BLOCK_I, num_warps, num_stages) per kernel kind. Counting keeps a [BLOCK_T, BLOCK_I]
# int32 + float64 accumulator per program, so it uses shorter tiles. (benchmarks/gpu_kernels.py
# --sweep times alternatives, e.g. 4 warps / 8-row count tiles and num_stages=2.)
CONFIGS = {"fwd": (32, 128, 4, 1), "count": (16, 128, 8, 1), "bwd": (16, 128, 8, 1)}
# Selected columns of a column block recomputed per step of the split ops (a small tile).
SEL_BLOCK = 16
# Row-range programs per column block when running under the CPU interpreter (tests override).
_INTERPRET_ROW_PROGS = 2
_DT_ID = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_resident_cache: dict = {}


def resident_programs(n_regs: int, num_warps: int, shared: int, props) -> int:
    """Programs of a compiled kernel one SM holds at once (registers, threads, shared memory)."""
    threads = 32 * num_warps
    regs = getattr(props, "regs_per_multiprocessor", 65536)
    max_threads = getattr(props, "max_threads_per_multi_processor", 2048)
    smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    fits = [max_threads // threads, regs // max(1, n_regs * threads), 32]
    if shared:
        fits.append(smem // shared)
    return max(1, min(fits))


def whole_waves(resident: int, col_blocks: int, row_blocks: int) -> int:
    """Row-range programs per column block so that the grid is whole waves of `resident`
    programs (rounded down: never one full wave plus a few blocks), at most one per row tile."""
    return max(1, min(row_blocks, resident // col_blocks))


def _device_ctx(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    import contextlib

    return contextlib.nullcontext()


def _launch(kernel, args: tuple, consts: dict, device, T: int, I: int, block_t: int, block_i: int,
            num_warps: int, num_stages: int, row_progs: Optional[int]) -> None:
    """kernel over column blocks x row ranges. The number of row ranges: `row_progs` if given;
    under the interpreter _INTERPRET_ROW_PROGS; on a GPU whole waves of what the compiled
    kernel's occupancy fits (measured once per kernel variant and device)."""
    col_blocks, row_blocks = triton.cdiv(I, block_i), triton.cdiv(T, block_t)
    if row_progs is None:
        if device.type == "cuda":
            key = (kernel.fn.__name__ if hasattr(kernel, "fn") else id(kernel), tuple(sorted(consts.items())),
                   num_warps, num_stages, device.index)
            if key not in _resident_cache:
                compiled = kernel.warmup(*args[:-1], block_t, grid=(1, 1), num_warps=num_warps, num_stages=num_stages,
                                         **consts)
                props = torch.cuda.get_device_properties(device)
                per_sm = resident_programs(compiled.n_regs, num_warps, compiled.metadata.shared, props)
                _resident_cache[key] = per_sm * props.multi_processor_count
            row_progs = whole_waves(_resident_cache[key], col_blocks, row_blocks)
        else:
            row_progs = _INTERPRET_ROW_PROGS
    row_progs = max(1, min(int(row_progs), row_blocks))
    rows_per_prog = triton.cdiv(row_blocks, row_progs) * block_t
    grid = (col_blocks, triton.cdiv(T, rows_per_prog))
    with _device_ctx(device):
        kernel[grid](*args[:-1], rows_per_prog, num_warps=num_warps, num_stages=num_stages, **consts)


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """Gradients may come in any layout: copy only when the last dim is not contiguous."""
    return t.contiguous() if t.shape[1] > 1 and t.stride(1) != 1 else t


def sel_slots(sel: torch.Tensor, intermediate: int) -> torch.Tensor:
    """int32 [I]: position of column i in sel, or -1 (no host sync)."""
    slot = torch.full((intermediate,), -1, dtype=torch.int32, device=sel.device)
    slot.scatter_(0, sel, torch.arange(sel.shape[0], dtype=torch.int32, device=sel.device))
    return slot


def _selection(sel, slots, I, block_i):
    """What the split kernels read: the slot map, sel as int32 columns, and each column block's
    first slot (``starts[b] .. starts[b + 1]`` are its selected columns; sel is sorted)."""
    if slots is None:
        slots = sel_slots(sel, I)
    bounds = torch.arange(0, I + block_i, block_i, device=sel.device)
    starts = torch.searchsorted(sel, bounds).to(torch.int32)
    return slots, sel.to(torch.int32), starts


# ----------------------------------------------------------------------------- implementations
# The *_impl functions take optional tile / grid overrides so the tests can exercise
# several programs and partial tiles with small tensors.


def _fwd_impl(gate, up, activation, *, count=False, token_lang=None, num_langs=1, sel=None, slots=None,
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
    if T == 0 or I == 0:
        return out, out_sel, over_zero, act_sum
    bt, bi, nw, ns = CONFIGS["count" if count else "fwd"]
    bt, bi = block_t or bt, block_i or bi
    split = split and k > 0  # nothing selected: plain act_mul
    slot_map, sel32, starts = _selection(sel, slots, I, bi) if split else (out, out, out)
    has_lang = token_lang is not None
    args = (gate, up, out, out_sel if split else out, slot_map, sel32, starts,
            token_lang if has_lang else out, over_zero if count else out, act_sum if count else out,
            T, I, k, num_langs, gate.stride(0), up.stride(0), None)
    consts = dict(ACT=_ACT_ID[activation], DT=_DT_ID[gate.dtype], PRECISE=device.type == "cuda", COUNT=count,
                  SPLIT=split, HAS_LANG=has_lang, BLOCK_T=bt, BLOCK_I=bi, SEL_BLOCK=SEL_BLOCK)
    _launch(_fwd_kernel, args, consts, device, T, I, bt, bi, nw, ns, row_progs)
    return out, out_sel, over_zero, act_sum


def _bwd_impl(grad_out, gate, up, activation, *, grad_out_sel=None, sel=None, slots=None,
              block_t=None, block_i=None, row_progs=None):
    T, I = gate.shape
    device = gate.device
    dt = gate.dtype
    grad_gate = torch.empty((T, I), dtype=dt, device=device)
    grad_up = torch.empty((T, I), dtype=dt, device=device)
    split = sel is not None
    k = sel.shape[0] if split else 0
    sel_outs = tuple(torch.empty((T, k), dtype=dt, device=device) for _ in range(3)) if split else None
    if T == 0 or I == 0:
        return grad_gate, grad_up, sel_outs
    bt, bi, nw, ns = CONFIGS["bwd"]
    bt, bi = block_t or bt, block_i or bi
    split = split and k > 0
    slot_map, sel32, starts = _selection(sel, slots, I, bi) if split else (grad_gate,) * 3
    gos = grad_out_sel.contiguous() if split else grad_gate
    grad_out = _rows_view(grad_out)
    d = grad_gate  # placeholder for pointers the kernel does not use
    args = (grad_out, gos, gate, up, grad_gate, grad_up, *(sel_outs if split else (d, d, d)),
            slot_map, sel32, starts, T, I, k, grad_out.stride(0), gate.stride(0), up.stride(0), None)
    consts = dict(ACT=_ACT_ID[activation], DT=_DT_ID[dt], PRECISE=device.type == "cuda", SPLIT=split,
                  BLOCK_T=bt, BLOCK_I=bi, SEL_BLOCK=SEL_BLOCK)
    _launch(_bwd_kernel, args, consts, device, T, I, bt, bi, nw, ns, row_progs)
    return grad_gate, grad_up, sel_outs


# ----------------------------------------------------------------------------- public ops


def act_mul(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """out = round(round(act(gate)) * up)."""
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
    """(grad_gate, grad_up) of out = round(act(gate)) * up."""
    checks.act_mul_backward_args(grad_out, gate, up, activation)
    grad_gate, grad_up, _ = _bwd_impl(grad_out, gate, up, activation)
    return grad_gate, grad_up


def act_mul_split(gate: torch.Tensor, up: torch.Tensor, activation: str, sel: torch.Tensor,
                  slots: Optional[torch.Tensor] = None):
    """(out with columns sel zeroed, out[:, sel]). With ``slots`` sel is not checked (no host sync)."""
    checks.act_mul_split_args(gate, up, activation, sel, slots, values=slots is None)
    out, out_sel, _, _ = _fwd_impl(gate, up, activation, sel=sel, slots=slots)
    return out, out_sel


def act_mul_backward_split(grad_out: torch.Tensor, grad_out_sel: torch.Tensor, gate: torch.Tensor,
                           up: torch.Tensor, activation: str, sel: torch.Tensor, slots: Optional[torch.Tensor] = None):
    """(grad_gate, grad_up, grad_gate_sel, grad_up_sel, out_sel); see docs/ARCHITECTURE.md."""
    checks.act_mul_backward_split_args(grad_out, grad_out_sel, gate, up, activation, sel, slots,
                                       values=slots is None)
    grad_gate, grad_up, sel_outs = _bwd_impl(grad_out, gate, up, activation, grad_out_sel=grad_out_sel, sel=sel,
                                             slots=slots)
    return (grad_gate, grad_up) + sel_outs
