"""Triton kernel of ``gate_up_act_mul_count``: the gate/up GEMMs with act_mul_count in the epilogue.

``gate_up_act_mul_count(x, w_gate, w_up, activation, token_lang, num_langs)`` computes
``gate = x @ w_gate.T`` and ``up = x @ w_up.T`` and, without ever writing them to memory,
``out = act(gate) * up`` (x.dtype) plus the LAPE counts ``over_zero`` (int64 [L, I]) and
``act_sum`` (float64 [L, I]) exactly as ``act_mul_count`` defines them (docs/ARCHITECTURE.md).
``lape_kernels.ops`` registers it for the CUDA dispatch key next to the kernels of
``triton_elementwise.py`` (whose activation code it reuses, so the two backends agree bit for bit
on act(g) for the same g).

Design:
- One program owns a [BLOCK_T, BLOCK_I] tile of *both* projections: two fp32 accumulators fed
  by the same x tile over the K = H loop (``tl.dot``), so x is read once per tile for the two.
  Programs are ordered in groups of GROUP_T row tiles per column block so that the weight tiles
  a group reads stay in L2.
- Epilogue, in fp32 at the rounding points of the module the op replaces (reference.py): the
  accumulators rounded to x.dtype (nn.Linear's output dtype), a = act(gate) rounded, out =
  a * up rounded; the rounding never needs memory. Counting: per language present in the
  tile's rows (ids outside [0, num_langs) are not counted; a tile usually holds one language),
  the column counts (int32, exact: at most BLOCK_T per tile) and float64 sums of the tile are
  reduced in registers and added with one atomic per column into over_zero / act_sum.
- fp32 inputs use ``input_precision="ieee"`` (true fp32 products, no TF32) so the op means the
  same on every backend. bf16/fp16 inputs go to the tensor cores as they are (their products
  are exact in fp32).
- Under ``TRITON_INTERPRET=1`` (CPU tensors, the tests) bf16/fp16 tiles are upcast to fp32
  before the dot (the interpreter's 16-bit arithmetic is not IEEE), which gives the same
  values: products of 16-bit floats are exact in fp32. Rounding and stores go through the
  bits (triton_elementwise._round / _store), exact under the interpreter too.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import checks
# The activation (and its id mapping), the language ids of a tile and the device context of the
# other Triton kernels: the same act(g) bits and the same counting rules.
from .triton_elementwise import _ACT_ID, _DT_ID, _act, _device_ctx, _round, _store, _tile_langs

__all__ = ["gate_up_act_mul_count"]


@triton.jit
def _gemm_count_kernel(
    x_ptr, wg_ptr, wu_ptr, out_ptr, lang_ptr, oz_ptr, sum_ptr,
    T, I, H, num_langs, stride_x, stride_wg, stride_wu,
    ACT: tl.constexpr, DT: tl.constexpr, PRECISE: tl.constexpr, HAS_LANG: tl.constexpr, UPCAST: tl.constexpr,
    FP32_DOT: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_T: tl.constexpr,
):
    """out[tile] = act(x w_gate^T) * (x w_up^T) at the module's rounding points; counts/sums of
    the tile's rows per language."""
    # Grouped program order: GROUP_T row tiles walk the column blocks together.
    pid = tl.program_id(0)
    n_t = tl.cdiv(T, BLOCK_T)
    n_i = tl.cdiv(I, BLOCK_I)
    per_group = GROUP_T * n_i
    first_t = (pid // per_group) * GROUP_T
    group_rows = tl.minimum(n_t - first_t, GROUP_T)
    pid_t = first_t + (pid % per_group) % group_rows
    pid_i = (pid % per_group) // group_rows

    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    rmask = rows < T
    cmask = cols < I
    # Rows/columns past the end read row 0 instead (no masks in the K loop); their results are
    # neither stored nor counted.
    rows_ld = tl.where(rmask, rows, 0).to(tl.int64)
    cols_ld = tl.where(cmask, cols, 0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows_ld[:, None] * stride_x + ks[None, :]        # [BLOCK_T, BLOCK_K]
    wg_ptrs = wg_ptr + cols_ld[None, :] * stride_wg + ks[:, None]     # [BLOCK_K, BLOCK_I]
    wu_ptrs = wu_ptr + cols_ld[None, :] * stride_wu + ks[:, None]

    acc_g = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            wgt = tl.load(wg_ptrs)
            wut = tl.load(wu_ptrs)
        else:
            kmask = ks < H - k0
            xt = tl.load(x_ptrs, mask=kmask[None, :], other=0.0)
            wgt = tl.load(wg_ptrs, mask=kmask[:, None], other=0.0)
            wut = tl.load(wu_ptrs, mask=kmask[:, None], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            wgt = wgt.to(tl.float32)
            wut = wut.to(tl.float32)
        if FP32_DOT:
            acc_g = tl.dot(xt, wgt, acc_g, input_precision="ieee")
            acc_u = tl.dot(xt, wut, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(xt, wgt, acc_g)
            acc_u = tl.dot(xt, wut, acc_u)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K

    # Epilogue, at the module's rounding points: gate and up rounded to the dtype (nn.Linear's
    # output), a = act(gate) rounded, out = a * up rounded.
    up = _round(acc_u, DT)
    a = _round(_act(_round(acc_g, DT), ACT, PRECISE), DT)
    r64 = rows.to(tl.int64)
    m2 = rmask[:, None] & cmask[None, :]
    _store(out_ptr + r64[:, None] * I + cols[None, :], a * up, m2)

    lang, valid, lmin, lmax = _tile_langs(lang_ptr, rows, rmask, num_langs, HAS_LANG)
    pos = a > 0.0
    # Each language present in the tile (usually one): reduce the tile's rows of that language
    # per column and add them once. No valid row: lmin = num_langs > lmax = -1, no iteration.
    for k in range(lmin, lmax + 1):
        km = (lang == k)[:, None] & cmask[None, :]
        c = tl.sum((km & pos).to(tl.int32), axis=0)
        s = tl.sum(tl.where(km, a, 0.0).to(tl.float64), axis=0)
        base = tl.cast(k, tl.int64) * I
        tl.atomic_add(oz_ptr + base + cols, c.to(tl.int64), mask=cmask & (c != 0), sem="relaxed")
        tl.atomic_add(sum_ptr + base + cols, s, mask=cmask & (s != 0.0), sem="relaxed")


# ----------------------------------------------------------------------------- launch config

# (BLOCK_T, BLOCK_I, BLOCK_K, GROUP_T, num_warps, num_stages). 16-bit inputs: a 128 x (2 x 128)
# output tile per program (the two accumulators), K step 64, three stages of 48 KiB of shared
# memory (fits an H100's 228 KiB). fp32 inputs run the ieee dot (FMA, no tensor cores): smaller
# tiles. benchmarks/gpu_kernels.py --sweep times alternatives.
CONFIGS = {
    "16bit": (128, 128, 64, 8, 8, 3),
    "fp32": (64, 64, 32, 8, 4, 2),
    # Under the CPU interpreter: small tiles so that tests cover several programs quickly.
    "interpret": (16, 32, 16, 2, 1, 1),
}


def _config(dtype: torch.dtype, device: torch.device):
    if device.type != "cuda":
        return CONFIGS["interpret"]
    return CONFIGS["fp32" if dtype == torch.float32 else "16bit"]


def _impl(x, w_gate, w_up, activation, token_lang, num_langs, *, block_t=None, block_i=None,
          block_k=None, group_t=None, num_warps=None, num_stages=None):
    """The launch, with optional tile overrides (tests, benchmark sweeps). Arguments are checked."""
    T, H = x.shape
    I = w_gate.shape[0]
    device = x.device
    out = torch.empty((T, I), dtype=x.dtype, device=device)
    over_zero = torch.zeros((num_langs, I), dtype=torch.int64, device=device)
    act_sum = torch.zeros((num_langs, I), dtype=torch.float64, device=device)
    if T == 0 or I == 0:
        return out, over_zero, act_sum
    bt, bi, bk, gt, nw, ns = _config(x.dtype, device)
    bt, bi, bk, gt = block_t or bt, block_i or bi, block_k or bk, group_t or gt
    nw, ns = num_warps or nw, num_stages or ns
    upcast = device.type != "cuda" and x.dtype != torch.float32
    has_lang = token_lang is not None
    if has_lang:
        token_lang = token_lang.contiguous()
    grid = (triton.cdiv(T, bt) * triton.cdiv(I, bi),)
    with _device_ctx(device):
        _gemm_count_kernel[grid](
            x, w_gate, w_up, out, token_lang if has_lang else over_zero, over_zero, act_sum,
            T, I, H, num_langs, x.stride(0), w_gate.stride(0), w_up.stride(0),
            ACT=_ACT_ID[activation], DT=_DT_ID[x.dtype], PRECISE=device.type == "cuda", HAS_LANG=has_lang,
            UPCAST=upcast,
            FP32_DOT=upcast or x.dtype == torch.float32, EVEN_K=H % bk == 0,
            BLOCK_T=bt, BLOCK_I=bi, BLOCK_K=bk, GROUP_T=gt, num_warps=nw, num_stages=ns,
        )
    return out, over_zero, act_sum


def gate_up_act_mul_count(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, activation: str,
                          token_lang: Optional[torch.Tensor], num_langs: int):
    """(act(x w_gate^T) * (x w_up^T), over_zero int64 [L, I], act_sum float64 [L, I]), one kernel."""
    checks.gate_up_act_mul_count_args(x, w_gate, w_up, activation, token_lang, num_langs)
    return _impl(x, w_gate, w_up, activation, token_lang, int(num_langs))
