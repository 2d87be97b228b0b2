"""The sparse MLP's autograd: one gated MLP ``down(act(gate(x)) * up(x))`` with rows ``sel`` of
gate/up and columns ``sel`` of down replaced by small trainable slices, computed without ever
forming a tensor of a weight's shape (docs/ARCHITECTURE.md, "Why the split ops").

The math every sparse-training forward runs: the dense MLPs (``sparse_mlp``) call the
``autograd.Function`` per layer, the routed experts (``sparse_experts``) run the same forward and
backward per expert inside one Function per MoE layer. One copy, so both have the same
rounding points and the same guarantees.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from ._autograd import per_device_function

__all__ = ["PARAM_NAMES", "INDEX_NAME", "SLOTS_NAME", "RECOMPUTE_MODES", "sparse_mlp_function", "check_recompute"]

#: names of the per-MLP trainable parameters / index buffer registered by ``set_trainable_neurons``
PARAM_NAMES = ("lape_gate_rows", "lape_up_rows", "lape_down_cols")
INDEX_NAME = "lape_neuron_index"
# The index's slot map (ops.sel_slots: sel checked once here, not by every kernel call)
SLOTS_NAME = "lape_neuron_slots"

try:  # loaded up front so that a torch.compile'd region never has to import it
    from ..kernels import ops as _kernel_ops
except (ImportError, OSError):  # the extension is not built: the error surfaces at the first forward
    _kernel_ops = None


def _ops():
    if _kernel_ops is None:
        from ..kernels import ops  # raises the extension's clear ImportError

        return ops
    return _kernel_ops


#: What the sparse MLP may recompute in backward instead of keeping from the forward:
#: "none" keeps gate and up (fastest), "up" recomputes up (one more [T,H]x[H,I] GEMM per layer,
#: saves T*I values per layer), "gate_up" recomputes both (two GEMMs, saves 2*T*I).
RECOMPUTE_MODES = ("none", "up", "gate_up")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _project(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], p: torch.Tensor, sel: torch.Tensor,
             cdt: torch.dtype) -> torch.Tensor:
    """``F.linear(x, w, b)`` with rows ``sel`` of ``w`` (and ``b``) replaced by the slice ``p``."""
    out = F.linear(x, w, b)
    bs = None if b is None else b.index_select(0, sel)
    out.index_copy_(1, sel, F.linear(x, p.to(cdt), bs).to(out.dtype))
    return out


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """``a @ b`` of operands in the 16-bit compute dtype ``cdt`` with fp32 accumulation and an fp32
    result: one GEMM of several pieces, summed in fp32, then rounded once, has the rounding of the
    single GEMM the unpatched model runs over the spliced weight. CUDA: mm's out_dtype; the CPU
    has no such kernel, so ``b`` (a weight) is upcast a block of rows at a time, never whole."""
    with torch.autocast(a.device.type, enabled=False):
        a = a.to(cdt)
        if a.device.type == "cuda":
            return torch.mm(a, b.to(cdt), out_dtype=torch.float32)
        k = a.shape[1]
        block = max(1, min(256, k // 2))
        out = a.new_zeros((a.shape[0], b.shape[1]), dtype=torch.float32)
        for k0 in range(0, k, block):
            out.addmm_(a[:, k0 : k0 + block].float(), b[k0 : k0 + block].to(cdt).float())
        return out


def _sparse_mlp_forward(ctx, x, wg, wu, wd, bg, bu, bd, pg, pu, pd, sel, activation, recompute,
                        fused_gate_up=False, slots=None):
    """y = down(act(gate(x)) * up(x)) with rows ``sel`` of gate/up and columns ``sel`` of down
    replaced by the trainable slices; gradients only for x and the slices."""
    ops = _ops()
    cdt = _compute_dtype(x)
    # The small trainable slices may be kept in a wider dtype (fp32 master slices);
    # casting them is cheap ([k, H]). The big weights go through F.linear as they are
    # (autocast casts them exactly as it does for the unpatched model).
    pdc = pd.to(cdt)
    gate = _project(x, wg, bg, pg, sel, cdt)
    up = _project(x, wu, bu, pu, sel, cdt)
    h0, hs = ops.act_mul_split(gate, up, activation, sel, slots)
    if cdt == torch.float32:
        y = F.linear(h0, wd, bd)
        y = y + F.linear(hs, pdc).to(y.dtype)
    else:  # 16-bit: the two parts summed in fp32 and rounded once, as F.linear(h, Wd') does
        y = _mm_fp32(h0, wd.t(), cdt) + _mm_fp32(hs, pdc.t(), cdt)
        y = (y if bd is None else y + bd.to(cdt).float()).to(cdt)
    # Saved: x and, unless recomputed in backward, gate and up ([T, I] each: the bulk of
    # a sparse step's activation memory); h is recomputed by act_mul_backward_split. The
    # weights are references, not copies.
    ctx.save_for_backward(x, gate if recompute != "gate_up" else None, up if recompute == "none" else None,
                          wg, wu, wd, bg, bu, pg, pu, pd, sel, slots)
    ctx.activation = activation
    ctx.fused_gate_up = fused_gate_up
    return y


def _sparse_mlp_backward(ctx, dy):
    ops = _ops()
    x, gate, up, wg, wu, wd, bg, bu, pg, pu, pd, sel, slots = ctx.saved_tensors
    cdt = _compute_dtype(x)
    # recomputation repeats the forward's ops on the same inputs under the same autocast
    # state (custom_bwd), so it reproduces gate/up exactly
    if gate is None:
        gate = _project(x, wg, bg, pg, sel, cdt)
    if up is None:
        up = _project(x, wu, bu, pu, sel, cdt)
    cdt = gate.dtype
    pgc, puc, pdc = pg.to(cdt), pu.to(cdt), pd.to(cdt)
    dy = dy.reshape(-1, dy.shape[-1])
    dh = torch.matmul(dy, wd).to(cdt)  # [T, I]; columns sel are replaced below
    dhs = torch.matmul(dy.to(cdt), pdc).to(cdt)  # [T, k]
    dgate, dup, dgate_s, dup_s, hs = ops.act_mul_backward_split(dh, dhs, gate, up, ctx.activation, sel, slots)
    del dh, gate, up
    dx = None
    if ctx.needs_input_grad[0] and cdt == torch.float32:
        dx = torch.matmul(dgate, wg) + torch.matmul(dup, wu)
        dx = dx + torch.matmul(dgate_s, pgc).to(dx.dtype) + torch.matmul(dup_s, puc).to(dx.dtype)
        dx = dx.to(x.dtype)
    elif ctx.needs_input_grad[0]:  # 16-bit: each projection's input gradient rounded once, as
        # autograd of the spliced linears gives it (one fused gate_up GEMM: one rounding for both)
        gx = _mm_fp32(dgate, wg, cdt) + _mm_fp32(dgate_s, pgc, cdt)
        ux = _mm_fp32(dup, wu, cdt) + _mm_fp32(dup_s, puc, cdt)
        if ctx.fused_gate_up:
            dx = (gx + ux).to(cdt).to(x.dtype)
        else:
            dx = gx.to(cdt).to(x.dtype) + ux.to(cdt).to(x.dtype)
    dpg = torch.matmul(dgate_s.t(), x.to(cdt)).to(pg.dtype) if ctx.needs_input_grad[7] else None
    dpu = torch.matmul(dup_s.t(), x.to(cdt)).to(pu.dtype) if ctx.needs_input_grad[8] else None
    dpd = torch.matmul(dy.t().to(cdt), hs).to(pd.dtype) if ctx.needs_input_grad[9] else None
    return dx, None, None, None, None, None, None, dpg, dpu, dpd, None, None, None, None, None


#: the sparse MLP's autograd.Function for a device type (``SparseMLPFunction_cpu``, ...)
_function_for = per_device_function("SparseMLPFunction", _sparse_mlp_forward, _sparse_mlp_backward)


def sparse_mlp_function(device_type: str):
    """The sparse MLP's ``autograd.Function`` for ``device_type``. ``apply(x, wg, wu, wd, bg, bu, bd,
    pg, pu, pd, sel, activation, recompute, fused_gate_up=False, slots=None)``."""
    return _function_for(device_type)


def warn_frozen_slices() -> None:
    """The trainable slices of a training forward are all frozen: say what froze them."""
    warnings.warn(  # one message for every layer: Python's filter shows it once
        f"the trainable neuron slices ({', '.join(PARAM_NAMES)}) are frozen "
        "(requires_grad=False), so the neurons do not train. Something froze them after patch(neurons=...): "
        "PEFT's get_peft_model freezes every non-adapter parameter. Apply PEFT first and then "
        "lape_kernels.patch(peft_model, neurons=..., keep_trainable=True), or unfreeze them: "
        "for p in lape_kernels.trainable_parameters(model): p.requires_grad_(True)",
        stacklevel=4,
    )


def check_recompute(recompute: str) -> str:
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    return recompute
