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

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from .. import patching
from ..introspection import mlp_modules, mlp_shape
from ..neurons.neuron_set import check_layer_indices
from ..wrappers import describe_adapters, mlp_adapters, parameter_wrapper, unwrap
from ._sparse_math import INDEX_NAME, PARAM_NAMES, RECOMPUTE_MODES, SLOTS_NAME, _function_for, _ops
from ._sparse_math import check_recompute as _check_recompute
from ._sparse_math import warn_frozen_slices
from .sparse_experts import (clear_expert_slices, expert_selection, install_expert_slices, is_expert_neuron_set,
                             select_expert_neurons)

_CLEANUP = "sparse_neurons"

__all__ = [
    "SparseState",
    "select_neurons",
    "select",
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

@dataclass
class SparseState:
    """``mlp._lape.sparse``: the patched forward's override for an MLP with trainable neurons."""

    recompute: str = "none"

    def forward(self, mlp: nn.Module, x2: torch.Tensor) -> torch.Tensor:
        return sparse_mlp_forward(mlp, x2)


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
        warn_frozen_slices()


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


def select_neurons(model: nn.Module, neurons: Any, language: Optional[str] = None, *,
                   allow_empty: bool = False) -> List[torch.Tensor]:
    """The per-layer sorted int64 CPU indices ``neurons`` selects, checked against the model's
    MLP weights (patched or not; nothing is changed, so ``patch`` checks before it patches).

    ``neurons``: per-layer list (one entry per decoder layer) of int64 index tensors, or a
    NeuronSet with ``language``. Selecting no neuron at all is an error (unless ``allow_empty``:
    expert neurons are selected too, and the two are checked together by :func:`select`).
    """
    shape = mlp_shape(model)
    per_layer = _per_layer(model, neurons, language)
    if len(per_layer) != shape.num_layers:
        if not shape.num_layers:
            raise ValueError(f"neurons has {len(per_layer)} layers, the model has no dense MLPs (its feed-forwards are "
                             "routed experts: use expert_neurons=)")
        raise ValueError(f"neurons has {len(per_layer)} layers, the model has {shape.num_layers} decoder layers")
    indices = [check_layer_indices(t, f"neurons[layer {li}]", shape.intermediate_size, int64_tensor=True)[0]
               for li, t in enumerate(per_layer)]
    if not allow_empty and not any(t.numel() for t in indices):
        _nothing_selected(language)
    return indices


def _nothing_selected(language: Optional[str]) -> None:
    which = f" for language {language!r}" if language is not None else ""
    raise ValueError(
        f"neurons selects no neuron in any layer{which}: nothing would be trained (a LAPE set is empty when "
        "too few tokens per language were counted or top_rate is too small)"
    )


def select(model: nn.Module, neurons: Any = None, language: Optional[str] = None,
           expert_neurons: Any = None) -> Tuple[Optional[List[torch.Tensor]], Optional[List[List[torch.Tensor]]]]:
    """(dense indices per layer or None, expert indices per MoE layer and expert or None): both
    selections checked (``select_neurons``, ``sparse_experts.select_expert_neurons``), and
    together they must select something."""
    if neurons is None and expert_neurons is None:
        raise ValueError("nothing to train: pass neurons= (dense MLPs) and/or expert_neurons= (routed experts)")
    if is_expert_neuron_set(neurons):  # a NeuronSet of a MoE model: its dense and its expert neurons
        if expert_neurons is not None:
            raise ValueError("pass expert_neurons= or a NeuronSet with expert neurons as neurons=, not both")
        expert_neurons = neurons
    dense = None if neurons is None else select_neurons(model, neurons, language, allow_empty=True)
    experts = None if expert_neurons is None else select_expert_neurons(model, expert_neurons, language)
    if not sum(int(t.numel()) for t in dense or ()) and not (experts and expert_selection(experts)):
        _nothing_selected(language)
    return dense, experts


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
    """The MLPs' and the experts' own parameters (every layer; no neuron slices yet): frozen while
    neurons train, because the sparse forwards compute those weights and biases as constants."""
    modules = patching.patched_mlps(model) + patching.patched_experts(model)
    return [p for module in modules for p in module.parameters()]


def set_trainable_neurons(model: nn.Module, neurons: Any = None, language: Optional[str] = None,
                          recompute: str = "none", keep_trainable: bool = False, *,
                          expert_neurons: Any = None) -> nn.Module:
    """Make exactly the selected neurons' weights trainable; freeze everything else (with
    ``keep_trainable``: freeze only the MLPs' and experts' own weights and biases, leaving other
    parameters that require grad, e.g. a PEFT adapter's, trainable).

    ``neurons``: what :func:`select_neurons` takes (the dense MLPs, a MoE model's shared experts
    included); ``expert_neurons``: what ``sparse_experts.select_expert_neurons`` takes (the routed
    experts). The model must be patched (``lape_kernels.patch`` calls this). Calling it again
    replaces the previous selection (its trained values are discarded). ``recompute`` trades
    activation memory for time (see ``RECOMPUTE_MODES``). Everything is checked before the model
    changes; an error inside a ``record()`` block (the sparse forward does not count).
    """
    _check_recompute(recompute)
    model = unwrap(model)
    if not patching.is_patched(model):
        raise RuntimeError("set_trainable_neurons needs a patched model: use lape_kernels.patch(model, neurons=...)")
    patching.check_not_recording(model, "set_trainable_neurons")
    indices, expert_indices = select(model, neurons, language, expert_neurons)

    if has_trainable_neurons(model):
        clear_trainable_neurons(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in (_mlp_base_parameters(model) if keep_trainable else model.parameters()):
        p.requires_grad_(False)
    for mlp, sel in zip(patching.patched_mlps(model), indices or ()):
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
    if expert_indices is not None:
        install_expert_slices(patching.patched_experts(model), expert_indices, recompute)
    model._lape_sparse = {"requires_grad": flags, "language": language}
    patching.add_cleanup(model, _CLEANUP, clear_trainable_neurons)
    return model


def _sparse_modules(model: nn.Module) -> List[nn.Module]:
    """The patched MLPs and then the patched experts modules that carry trainable slices."""
    modules = patching.patched_mlps(model) + patching.patched_experts(model)
    return [m for m in modules if getattr(m._lape, "sparse", None) is not None]


def set_recompute(model: nn.Module, recompute: str) -> nn.Module:
    """Change what the sparse MLPs (and experts) recompute in backward (keeps the trained values)."""
    _check_recompute(recompute)
    model = unwrap(model)
    if not has_trainable_neurons(model):
        raise RuntimeError("recompute applies to sparse neuron training: use lape_kernels.patch(model, neurons=...)")
    for module in _sparse_modules(model):
        module._lape.sparse.recompute = recompute
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
    for experts in (patching.patched_experts(model) if patching.is_patched(model) else ()):
        clear_expert_slices(experts)
    flags = info["requires_grad"]
    for name, p in model.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])
    del model._lape_sparse
    return model


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The trainable neuron slices: per dense MLP in layer order (gate rows, up rows, down cols),
    then per MoE layer's experts in layer order (the same three, over the layer's selected
    (expert, neuron) pairs): what to hand to the optimizer."""
    if not has_trainable_neurons(model):
        raise RuntimeError("model has no trainable neurons: use lape_kernels.patch(model, neurons=...)")
    return [getattr(module, n) for module in _sparse_modules(unwrap(model)) for n in PARAM_NAMES]
