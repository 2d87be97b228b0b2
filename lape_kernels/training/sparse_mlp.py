"""Sparse neuron fine-tuning: train only the selected neurons' weights of each gated MLP.

For the selected neurons ``sel`` of a layer (k of them) we train ``Pg = Wg[sel]`` ``[k, H]``,
``Pu = Wu[sel]`` ``[k, H]`` and ``Pd = Wd[:, sel]`` ``[H, k]`` as separate small parameters and
keep the base weights frozen and untouched. The MLP output is computed as if those slices had
been written into the weights, by one ``torch.autograd.Function`` that never forms a tensor of a
weight's shape: no dense ``dW``, no weight clone, no full-size mask (the paper's implementation
clones the full weight each step and gets a dense gradient). See docs/ARCHITECTURE.md,
"Why the split ops", for the math.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import patching
from ..introspection import mlp_modules, mlp_shape
from ..neurons.neuron_set import check_layer_indices
from ..wrappers import describe_adapters, mlp_adapters, parameter_wrapper, unwrap
from ._autograd import per_device_function

_CLEANUP = "sparse_neurons"

__all__ = [
    "SparseState",
    "select_neurons",
    "set_trainable_neurons",
    "clear_trainable_neurons",
    "sparse_mlp_forward",
    "trainable_parameters",
    "set_recompute",
    "RECOMPUTE_MODES",
    "has_trainable_neurons",
    "check_can_add_parameters",
    "PARAM_NAMES",
]

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


@dataclass
class SparseState:
    """``mlp._lape.sparse``: the patched forward's override for an MLP with trainable neurons."""

    recompute: str = "none"

    def forward(self, mlp: nn.Module, x2: torch.Tensor) -> torch.Tensor:
        return sparse_mlp_forward(mlp, x2)


#: What the sparse MLP may recompute in backward instead of keeping from the forward:
#: "none" keeps gate and up (fastest), "up" recomputes up (one more [T,H]x[H,I] GEMM per layer,
#: saves T*I values per layer), "gate_up" recomputes both (two GEMMs, saves 2*T*I).
RECOMPUTE_MODES = ("none", "up", "gate_up")


# ----------------------------------------------------------------------------- autograd


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


def _check_sparse_mlp(mlp: nn.Module, layer_index: int) -> None:
    """What the sparse forward cannot compute exactly, or what would make it train nothing."""
    if mlp_adapters(mlp):
        raise RuntimeError(
            f"layer {layer_index}: the MLP's {describe_adapters(mlp, [mlp])} are adapter layers: sparse neuron "
            "training computes the "
            "MLP from its base weights and would leave the adapter out. Train the neurons with adapters only outside "
            "the MLP (e.g. LoRA on q_proj/v_proj), or merge the adapter first (peft_model.merge_and_unload())"
        )
    if mlp.training and torch.is_grad_enabled() and not any(getattr(mlp, n).requires_grad for n in PARAM_NAMES):
        warnings.warn(  # one message for every layer: Python's filter shows it once
            f"the trainable neuron slices ({', '.join(PARAM_NAMES)}) are frozen "
            "(requires_grad=False), so the neurons do not train. Something froze them after patch(neurons=...): "
            "PEFT's get_peft_model freezes every non-adapter parameter. Apply PEFT first and then "
            "lape_kernels.patch(peft_model, neurons=..., keep_trainable=True), or unfreeze them: "
            "for p in lape_kernels.trainable_parameters(model): p.requires_grad_(True)",
            stacklevel=3,
        )


def sparse_mlp_forward(mlp: nn.Module, x2: torch.Tensor) -> torch.Tensor:
    """The MLP output ``[T, H]`` for ``x2`` ``[T, H]`` with the trainable neuron slices in place."""
    st = mlp._lape
    if st.sparse is None:
        raise RuntimeError("sparse_mlp_forward called on an MLP without trainable neurons")
    _check_sparse_mlp(mlp, st.layer_index)
    wg, wu, wd = patching.weights(mlp)
    bg, bu, bd = patching.biases(mlp)
    for name, t in (("weights", wg), ("weights", wu), ("weights", wd), ("biases", bg), ("biases", bu), ("biases", bd)):
        if t is not None and t.requires_grad:
            raise RuntimeError(
                f"layer {st.layer_index}: the MLP's base {name} require grad while sparse neuron training is "
                "active; only the lape_* slices are trained (re-freeze the base weights, or unpatch first)"
            )
    fn = _function_for(x2.device.type)
    return fn.apply(
        x2, wg, wu, wd, bg, bu, bd,
        mlp.lape_gate_rows, mlp.lape_up_rows, mlp.lape_down_cols,
        getattr(mlp, INDEX_NAME), st.activation, st.sparse.recompute, st.family.fused_gate_up,
        getattr(mlp, SLOTS_NAME),
    )


# ----------------------------------------------------------------------------- set / clear


def _per_layer(model: nn.Module, neurons: Any, language: Optional[str]) -> List[Any]:
    if isinstance(neurons, (list, tuple)):
        if language is not None:
            raise ValueError("language= is only meaningful with a NeuronSet; got a per-layer list")
        return list(neurons)
    if isinstance(neurons, torch.Tensor) or not hasattr(neurons, "__getitem__"):
        raise TypeError(
            "neurons must be a per-layer list of int64 index tensors (one per decoder layer) or a NeuronSet "
            f"with language=..., got {type(neurons).__name__}"
        )
    langs = list(getattr(neurons, "languages", []))
    if language is None:
        raise ValueError(f"neurons is a NeuronSet: pass language= (one of {langs})")
    if langs and language not in langs:
        raise KeyError(f"language {language!r} not in the NeuronSet (languages: {langs})")
    validate = getattr(neurons, "validate", None)
    if callable(validate):
        validate(model)
    return list(neurons[language])


def select_neurons(model: nn.Module, neurons: Any, language: Optional[str] = None) -> List[torch.Tensor]:
    """The per-layer sorted int64 CPU indices ``neurons`` selects, checked against the model's
    MLP weights (patched or not; nothing is changed, so ``patch`` checks before it patches).

    ``neurons``: per-layer list (one entry per decoder layer) of int64 index tensors, or a
    NeuronSet with ``language``. Selecting no neuron at all is an error.
    """
    shape = mlp_shape(model)
    per_layer = _per_layer(model, neurons, language)
    if len(per_layer) != shape.num_layers:
        raise ValueError(f"neurons has {len(per_layer)} layers, the model has {shape.num_layers} decoder layers")
    indices = [check_layer_indices(t, f"neurons[layer {li}]", shape.intermediate_size, int64_tensor=True)[0]
               for li, t in enumerate(per_layer)]
    if not any(t.numel() for t in indices):
        which = f" for language {language!r}" if language is not None else ""
        raise ValueError(
            f"neurons selects no neuron in any layer{which}: nothing would be trained (a LAPE set is empty when "
            "too few tokens per language were counted or top_rate is too small)"
        )
    return indices


def _check_recompute(recompute: str) -> str:
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    return recompute


def check_can_add_parameters(model: nn.Module, what: str) -> None:
    """Refuse to add the trainable neuron slices to a model whose parameters a distributed
    wrapper already took note of (DDP's reducer, FSDP's shards): the slices would train
    unsynchronised, or not at all. ``model``: as the user passed it (the wrapper included)."""
    wrapper = parameter_wrapper(model)
    if wrapper is not None:
        raise RuntimeError(
            f"{what}: the model is wrapped by {wrapper}, which registered its parameters when it was built; the "
            "trainable neuron slices added now would not be synchronised across processes. Call "
            "lape_kernels.patch(model, neurons=...) (or load_neurons) on the plain model first, then wrap it"
        )


def _mlp_base_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The MLPs' own parameters (every layer; no neuron slices yet): frozen while neurons
    train, because the sparse forward computes the MLP's weights and biases as constants."""
    return [p for mlp in patching.patched_mlps(model) for p in mlp.parameters()]


def set_trainable_neurons(model: nn.Module, neurons: Any, language: Optional[str] = None,
                          recompute: str = "none", keep_trainable: bool = False) -> nn.Module:
    """Make exactly the selected neurons' weights trainable; freeze everything else (with
    ``keep_trainable``: freeze only the MLPs' own weights and biases, leaving other parameters
    that require grad, e.g. a PEFT adapter's, trainable).

    ``neurons``: what :func:`select_neurons` takes. The model must be patched
    (``lape_kernels.patch`` calls this). Calling it again replaces the previous selection (its
    trained values are discarded). ``recompute`` trades activation memory for time (see
    ``RECOMPUTE_MODES``). Everything is checked before the model changes; an error inside a
    ``record()`` block (the sparse forward does not count).
    """
    _check_recompute(recompute)
    model = unwrap(model)
    if not patching.is_patched(model):
        raise RuntimeError("set_trainable_neurons needs a patched model: use lape_kernels.patch(model, neurons=...)")
    patching.check_not_recording(model, "set_trainable_neurons")
    indices = select_neurons(model, neurons, language)

    if has_trainable_neurons(model):
        clear_trainable_neurons(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in (_mlp_base_parameters(model) if keep_trainable else model.parameters()):
        p.requires_grad_(False)
    for mlp, sel in zip(patching.patched_mlps(model), indices):
        if sel.numel() == 0:
            continue
        wg, wu, wd = patching.weights(mlp)
        sel = sel.to(wg.device)
        with torch.no_grad():
            mlp.register_parameter(PARAM_NAMES[0], nn.Parameter(wg.index_select(0, sel).clone()))
            mlp.register_parameter(PARAM_NAMES[1], nn.Parameter(wu.index_select(0, sel).clone()))
            mlp.register_parameter(PARAM_NAMES[2], nn.Parameter(wd.index_select(1, sel).contiguous()))
        mlp.register_buffer(INDEX_NAME, sel, persistent=True)
        mlp.register_buffer(SLOTS_NAME, _ops().sel_slots(sel, wg.shape[0]), persistent=False)
        mlp._lape.sparse = SparseState(recompute=recompute)
    model._lape_sparse = {"requires_grad": flags, "language": language}
    patching.add_cleanup(model, _CLEANUP, clear_trainable_neurons)
    return model


def set_recompute(model: nn.Module, recompute: str) -> nn.Module:
    """Change what the sparse MLPs recompute in backward (keeps the trained values)."""
    _check_recompute(recompute)
    model = unwrap(model)
    if not has_trainable_neurons(model):
        raise RuntimeError("recompute applies to sparse neuron training: use lape_kernels.patch(model, neurons=...)")
    for mlp in patching.patched_mlps(model):
        if getattr(mlp._lape, "sparse", None) is not None:
            mlp._lape.sparse.recompute = recompute
    return model


def has_trainable_neurons(model: nn.Module) -> bool:
    return unwrap(model).__dict__.get("_lape_sparse") is not None


def clear_trainable_neurons(model: nn.Module) -> nn.Module:
    """Remove the trainable slices (discarding their values) and restore ``requires_grad`` flags."""
    model = unwrap(model)
    info = model.__dict__.get("_lape_sparse")
    if info is None:
        return model
    patching.drop_cleanup(model, _CLEANUP)
    # the MLPs patch found (an adapter added since hides an MLP from discovery)
    for mlp in (patching.patched_mlps(model) if patching.is_patched(model) else mlp_modules(model)):
        for name in PARAM_NAMES:
            if name in mlp._parameters:
                del mlp._parameters[name]
        for name in (INDEX_NAME, SLOTS_NAME):
            if name in mlp._buffers:
                del mlp._buffers[name]
        st = getattr(mlp, "_lape", None)
        if st is not None:
            st.sparse = None
    flags = info["requires_grad"]
    for name, p in model.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])
    del model._lape_sparse
    return model


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The trainable neuron slices in layer order (gate rows, up rows, down cols per layer):
    what to hand to the optimizer."""
    if not has_trainable_neurons(model):
        raise RuntimeError("model has no trainable neurons: use lape_kernels.patch(model, neurons=...)")
    out: List[nn.Parameter] = []
    for mlp in patching.patched_mlps(model):
        if getattr(mlp._lape, "sparse", None) is not None:
            out.extend(getattr(mlp, n) for n in PARAM_NAMES)
    return out
