"""``deactivate``: zero chosen neurons' activations in a model's MLPs for a block (the
LAPE ablation), through the patched forward; the weights are never touched."""
from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence, Tuple

import torch

from .. import patching
from .neuron_set import NeuronSet, PerLayer, _as_index_tensor

__all__ = ["deactivate"]


def _resolve_neurons(neurons: Any) -> Tuple[PerLayer, Optional[NeuronSet]]:
    if isinstance(neurons, tuple) and len(neurons) == 2 and isinstance(neurons[0], NeuronSet):
        ns, lang = neurons
        return ns.select(lang), ns
    if isinstance(neurons, NeuronSet):
        raise TypeError("pass (NeuronSet, language), not a bare NeuronSet: which language to deactivate?")
    if isinstance(neurons, (torch.Tensor, str)) or not isinstance(neurons, Sequence):
        raise TypeError(f"neurons must be a per-layer list of index tensors or (NeuronSet, language), "
                        f"got {type(neurons).__name__}")
    return [_as_index_tensor(t, f"neurons[layer {li}]") for li, t in enumerate(neurons)], None


@contextlib.contextmanager
def deactivate(model: torch.nn.Module, neurons: Any):
    """Zero the given neurons' ``act(gate) * up`` in every MLP for the duration of the block.

    ``neurons``: a per-layer list of index tensors (one per decoder layer) or
    ``(NeuronSet, language)``. Sets ``mlp._lape.deactivated`` on each patched MLP and restores
    the previous value on exit, also on an exception. Inside another ``deactivate`` block the
    neurons add to those already deactivated. An unpatched model is patched for the duration
    and unpatched afterwards.
    """
    per_layer, ns = _resolve_neurons(neurons)
    was_patched = patching.is_patched(model)
    if not was_patched:
        patching.patch_mlps(model)
    try:
        mlps = patching.patched_mlps(model)
        if len(per_layer) != len(mlps):
            raise ValueError(f"neurons cover {len(per_layer)} layers, the model has {len(mlps)} MLPs")
        new = []
        for li, (mlp, idx) in enumerate(zip(mlps, per_layer)):
            inter = patching.weights(mlp)[0].shape[0]
            if ns is not None and ns.intermediate_size not in (None, inter):
                raise ValueError(f"neuron set was made for intermediate_size {ns.intermediate_size}, "
                                 f"layer {li} of the model has {inter}")
            idx = torch.unique(idx, sorted=True) if idx.numel() else idx
            if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= inter):
                raise ValueError(f"layer {li}: index out of range [0, {inter}): "
                                 f"{int(idx[0]) if int(idx[0]) < 0 else int(idx[-1])}")
            prev = mlp._lape.deactivated
            if prev is not None and prev.numel():
                idx = torch.unique(torch.cat([prev.detach().cpu().long(), idx]), sorted=True)
            device = patching.weights(mlp)[0].device
            new.append(idx.to(device) if idx.numel() else prev)
        saved = [mlp._lape.deactivated for mlp in mlps]
        try:
            for mlp, idx in zip(mlps, new):
                mlp._lape.deactivated = idx
            yield model
        finally:
            for mlp, prev in zip(mlps, saved):
                mlp._lape.deactivated = prev
    finally:
        if not was_patched:
            patching.unpatch(model)
