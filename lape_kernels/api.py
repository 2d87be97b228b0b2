"""The public entry point that composes the rooms: ``patch`` installs the patched MLP forward
(patching), the chunked LM-head loss and, with ``neurons=``, the trainable neuron slices
(training). ``unpatch`` is patching's: it undoes all of it."""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .patching import patch_mlps, unpatch
from .training.loss import install_chunked_loss
from .training.sparse_mlp import (
    RECOMPUTE_MODES,
    has_trainable_neurons,
    select_neurons,
    set_recompute,
    set_trainable_neurons,
)

__all__ = ["patch", "unpatch"]


def patch(
    model: nn.Module,
    neurons: Any = None,
    language: Optional[str] = None,
    chunked_loss: bool = True,
    recompute: Optional[str] = None,
) -> nn.Module:
    """Route ``model``'s MLPs through lape_kernels ops (in place; returns ``model``).

    Idempotent: patching a patched model only applies what is new (e.g. ``neurons``).
    ``neurons`` (a per-layer list of index tensors, or a ``NeuronSet`` with ``language``) makes
    exactly those neurons' weights trainable (sparse neuron fine-tuning); everything else is frozen.
    ``chunked_loss`` makes ``model(..., labels=...)`` use the memory-lean chunked LM-head loss.
    ``recompute`` ("none", "up" or "gate_up"; sparse training only) makes the sparse MLPs
    recompute those projections in backward instead of keeping them: less activation memory, one
    or two more GEMMs per layer.

    The arguments are checked before the model changes: a bad ``neurons`` or ``recompute``
    leaves an unpatched model unpatched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects a torch.nn.Module, got {type(model).__name__}")
    if recompute is not None:
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
        if neurons is None and not has_trainable_neurons(model):
            raise ValueError("recompute applies to sparse neuron training: pass neurons= as well")
    if neurons is not None:
        select_neurons(model, neurons, language)  # raises on a bad selection, before any change
    patch_mlps(model)
    if chunked_loss:
        install_chunked_loss(model)
    if neurons is not None:
        set_trainable_neurons(model, neurons, language=language, recompute=recompute or "none")
    elif recompute is not None:
        set_recompute(model, recompute)
    return model
