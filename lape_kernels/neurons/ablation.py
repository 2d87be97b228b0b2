"""``deactivate``: zero chosen neurons' activations in a model's MLPs for a block (the
LAPE ablation), through the patched forward; the weights are never touched."""
from __future__ import annotations

import contextlib
from typing import Any, List, Optional, Sequence, Tuple

import torch

from .. import patching
from ..introspection import mlp_shape
from ..wrappers import unsharded, unwrap
from .neuron_set import NeuronSet, PerLayer, check_layer_indices

__all__ = ["deactivate"]


def _resolve_neurons(neurons: Any) -> Tuple[Sequence[Any], Optional[NeuronSet]]:
    if isinstance(neurons, tuple) and len(neurons) == 2 and isinstance(neurons[0], NeuronSet):
        ns, lang = neurons
        return ns.select(lang), ns
    if isinstance(neurons, NeuronSet):
        raise TypeError("pass (NeuronSet, language), not a bare NeuronSet: which language to deactivate?")
    if isinstance(neurons, (torch.Tensor, str)) or not isinstance(neurons, Sequence):
        raise TypeError(f"neurons must be a per-layer list of index tensors or (NeuronSet, language), "
                        f"got {type(neurons).__name__}")
    return neurons, None


def _checked_indices(model: torch.nn.Module, neurons: Any) -> PerLayer:
    """Per-layer sorted CPU indices of ``neurons``, checked against the model's MLPs (before
    anything is changed)."""
    per_layer, ns = _resolve_neurons(neurons)
    shape = mlp_shape(model)
    if len(per_layer) != shape.num_layers:
        raise ValueError(f"neurons cover {len(per_layer)} layers, the model has {shape.num_layers} MLPs")
    if ns is not None and ns.intermediate_size not in (None, shape.intermediate_size):
        raise ValueError(f"neuron set was made for intermediate_size {ns.intermediate_size}, "
                         f"the model's MLPs have {shape.intermediate_size}")
    if ns is not None:
        ns.validate(model)  # made for this model (fingerprint): a transfer is explicit, ns.transfer_to(model)
    return [check_layer_indices(t, f"neurons[layer {li}]", shape.intermediate_size)[0]
            for li, t in enumerate(per_layer)]


@contextlib.contextmanager
def deactivate(model: torch.nn.Module, neurons: Any):
    """Zero the given neurons' ``act(gate) * up`` in every MLP for the duration of the block.

    ``neurons``: a per-layer list of index tensors (one per decoder layer) or
    ``(NeuronSet, language)``. Sets ``mlp._lape.deactivated`` on each patched MLP and restores
    the previous value on exit, also on an exception. Inside another ``deactivate`` block the
    neurons add to those already deactivated. An unpatched model is patched for the duration
    and unpatched afterwards; bad neurons are an error before the model is changed. ``model``
    may be wrapped (PEFT, DDP, ``torch.compile``): the HF model inside is changed.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"deactivate expects a torch.nn.Module, got {type(model).__name__}")
    outer, model = model, unwrap(model)  # PEFT, DDP, torch.compile, ...: the HF model inside
    patching.check_no_mlp_adapters(model, "deactivate")
    with unsharded(model):  # FSDP2: the MLPs' full weights while they are checked
        per_layer = _checked_indices(model, neurons)
    was_patched = patching.is_patched(model)
    if not was_patched:
        patching.patch_mlps(model)
    try:
        mlps = patching.patched_mlps(model)
        saved = [mlp._lape.deactivated for mlp in mlps]
        new: List[Optional[torch.Tensor]] = []
        for mlp, idx, prev in zip(mlps, per_layer, saved):
            if prev is not None and prev.numel():
                idx = torch.unique(torch.cat([prev.detach().cpu().long(), idx]), sorted=True)
            new.append(idx.to(patching.weights(mlp)[0].device) if idx.numel() else prev)
        try:
            for mlp, idx in zip(mlps, new):
                mlp._lape.deactivated = idx
            yield outer
        finally:
            for mlp, prev in zip(mlps, saved):
                mlp._lape.deactivated = prev
    finally:
        if not was_patched:
            patching.unpatch(model)
