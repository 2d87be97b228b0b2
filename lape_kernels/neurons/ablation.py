"""``deactivate``: zero chosen neurons' activations in a model's MLPs and experts for a block
(the LAPE ablation), through the patched forward; the weights are never touched."""
from __future__ import annotations

import contextlib
from typing import Any, List, Optional, Sequence, Tuple

import torch

from .. import patching
from ..introspection import expert_shape, mlp_shape
from ..wrappers import unsharded, unwrap
from .indices import ExpertLayout, PerExpert, check_expert_indices
from .neuron_set import NeuronSet, PerLayer, check_layer_indices

__all__ = ["deactivate"]


def _resolve_neurons(neurons: Any) -> Tuple[Sequence[Any], Optional[NeuronSet]]:
    if isinstance(neurons, tuple) and len(neurons) == 2 and isinstance(neurons[0], NeuronSet):
        ns, lang = neurons
        return ns.select(lang), ns
    if neurons is None:
        return [], None
    if isinstance(neurons, NeuronSet):
        raise TypeError("pass (NeuronSet, language), not a bare NeuronSet: which language to deactivate?")
    if isinstance(neurons, (torch.Tensor, str)) or not isinstance(neurons, Sequence):
        raise TypeError(f"neurons must be a per-layer list of index tensors or (NeuronSet, language), "
                        f"got {type(neurons).__name__}")
    return neurons, None


def _checked_indices(model: torch.nn.Module, neurons: Any, expert_neurons: Any) -> Tuple[PerLayer, Optional[PerExpert]]:
    """Per-layer sorted CPU indices of ``neurons`` and per-(MoE layer, expert) of the expert
    neurons, checked against the model's MLPs and experts (before anything is changed)."""
    if neurons is None and expert_neurons is None:
        raise TypeError("deactivate needs neurons (per-layer indices or (NeuronSet, language)) and/or expert_neurons")
    per_layer, ns = _resolve_neurons(neurons)
    if ns is not None and ns.has_experts:
        if expert_neurons is not None:
            raise ValueError("pass expert_neurons= or a NeuronSet with expert neurons, not both")
        expert_neurons = ns.select_experts(neurons[1])
    shape = mlp_shape(model)
    if neurons is None:
        per_layer = [torch.empty(0, dtype=torch.int64)] * shape.num_layers
    experts = None
    if expert_neurons is not None:
        ex = expert_shape(model)
        if ex is None:
            raise ValueError("expert_neurons given, but the model has no mixture-of-experts layers")
        experts, _ = check_expert_indices(expert_neurons, "expert_neurons",
                                          ExpertLayout(tuple(ex.layers), ex.num_experts, ex.intermediate_size))
    if len(per_layer) != shape.num_layers:
        raise ValueError(f"neurons cover {len(per_layer)} layers, the model has {shape.num_layers} MLPs")
    if ns is not None and ns.intermediate_size not in (None, shape.intermediate_size):
        raise ValueError(f"neuron set was made for intermediate_size {ns.intermediate_size}, "
                         f"the model's MLPs have {shape.intermediate_size}")
    if ns is not None:
        ns.validate(model)  # made for this model (fingerprint): a transfer is explicit, ns.transfer_to(model)
    return [check_layer_indices(t, f"neurons[layer {li}]", shape.intermediate_size)[0]
            for li, t in enumerate(per_layer)], experts


def _expert_masks(experts_modules: List[torch.nn.Module], experts: PerExpert) -> List[Optional[torch.Tensor]]:
    """Per MoE layer, bool ``[E, I]`` (True = zeroed) on the weights' device, None where nothing
    is deactivated; OR-ed with what an enclosing block deactivated."""
    out: List[Optional[torch.Tensor]] = []
    for module, per_expert in zip(experts_modules, experts):
        st = module._lape
        prev = st.deactivated
        if not any(t.numel() for t in per_expert):
            out.append(prev)
            continue
        mask = torch.zeros(st.num_experts, st.intermediate_size, dtype=torch.bool)
        for e, idx in enumerate(per_expert):
            mask[e, idx] = True
        mask = mask.to(module.down_proj.device)
        out.append(mask if prev is None else (mask | prev))
    return out


@contextlib.contextmanager
def deactivate(model: torch.nn.Module, neurons: Any = None, *, expert_neurons: Any = None):
    """Zero the given neurons' ``act(gate) * up`` in every MLP for the duration of the block.

    ``neurons``: a per-layer list of index tensors (one per decoder layer with a dense MLP) or
    ``(NeuronSet, language)`` (its expert neurons too, when it has them). ``expert_neurons``
    (mixture-of-experts models): a list over MoE layers of lists over experts of index tensors
    (``NeuronSet.select_experts``); a deactivated expert neuron contributes nothing to the
    outputs of the tokens routed to its expert, as if its column of the expert's down weights
    were zero. Sets ``mlp._lape.deactivated`` on each patched MLP (and
    ``experts._lape.deactivated``, a bool [experts, intermediate] mask) and restores the
    previous values on exit, also on an exception. Inside another ``deactivate`` block the
    neurons add to those already deactivated. An unpatched model is patched for the duration
    and unpatched afterwards; bad neurons are an error before the model is changed. ``model``
    may be wrapped (PEFT, DDP, ``torch.compile``): the HF model inside is changed.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"deactivate expects a torch.nn.Module, got {type(model).__name__}")
    outer, model = model, unwrap(model)  # PEFT, DDP, torch.compile, ...: the HF model inside
    patching.check_no_mlp_adapters(model, "deactivate")
    with unsharded(model):  # FSDP2: the MLPs' full weights while they are checked
        per_layer, experts = _checked_indices(model, neurons, expert_neurons)
    was_patched = patching.is_patched(model)
    if was_patched:  # the sparse-training forwards compute with the trained slices and deactivate nothing
        sparse = sorted({m._lape.layer_index for m in patching.patched_mlps(model) + patching.patched_experts(model)
                         if m._lape.sparse is not None})
        if sparse:
            raise RuntimeError(f"deactivate: layers {sparse} run the sparse-training forward (trainable neurons), which "
                               "deactivates nothing; merge the trained neurons first (lape_kernels.merge) or unpatch")
    if not was_patched:
        patching.patch_mlps(model)
    try:
        mlps = patching.patched_mlps(model)
        experts_modules = patching.patched_experts(model) if experts is not None else []
        saved = [mlp._lape.deactivated for mlp in mlps]
        saved_experts = [x._lape.deactivated for x in experts_modules]
        new: List[Optional[torch.Tensor]] = []
        for mlp, idx, prev in zip(mlps, per_layer, saved):
            if prev is not None and prev.numel():
                idx = torch.unique(torch.cat([prev.detach().cpu().long(), idx]), sorted=True)
            new.append(idx.to(patching.weights(mlp)[0].device) if idx.numel() else prev)
        new_experts = _expert_masks(experts_modules, experts) if experts is not None else []
        try:
            for mlp, idx in zip(mlps, new):
                mlp._lape.deactivated = idx
            for x, mask in zip(experts_modules, new_experts):
                x._lape.deactivated = mask
            yield outer
        finally:
            for mlp, prev in zip(mlps, saved):
                mlp._lape.deactivated = prev
            for x, prev in zip(experts_modules, saved_experts):
                x._lape.deactivated = prev
    finally:
        if not was_patched:
            patching.unpatch(model)
