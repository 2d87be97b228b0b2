"""The public entry point that composes the rooms: ``patch`` installs the patched MLP forward
(patching), the chunked LM-head loss and, with ``neurons=``, the trainable neuron slices
(training). ``unpatch`` is patching's: it undoes all of it.

Both take the model or any wrapper around it (PEFT, DDP, ``torch.compile``, accelerate) and act
on the Hugging Face model inside (:mod:`lape_kernels.wrappers`)."""
from __future__ import annotations

import warnings
from typing import Any, Optional

from torch import nn

from .patching import check_no_mlp_adapters, check_not_recording, is_patched, patch_mlps, unpatch
from .training.loss import check_chunked_loss, has_chunked_loss, install_chunked_loss, uninstall_chunked_loss
from .training.sparse_mlp import (
    RECOMPUTE_MODES,
    check_can_add_parameters,
    has_trainable_neurons,
    select,
    set_recompute,
    set_trainable_neurons,
)
from .wrappers import trainable_adapter_parameters, unwrap

__all__ = ["patch", "unpatch"]


def patch(
    model: nn.Module,
    neurons: Any = None,
    language: Optional[str] = None,
    chunked_loss: bool = True,
    recompute: Optional[str] = None,
    keep_trainable: Optional[bool] = None,
    expert_neurons: Any = None,
) -> nn.Module:
    """Route ``model``'s MLPs through lape_kernels ops (in place; returns ``model``).

    Idempotent: patching a patched model only applies what is new (e.g. ``neurons``).
    ``neurons`` (a per-layer list of index tensors, or a ``NeuronSet`` with ``language``) makes
    exactly those neurons' weights trainable (sparse neuron fine-tuning); every other parameter
    is frozen, unless ``keep_trainable=True``: then parameters that already require grad (e.g. a
    PEFT adapter's LoRA weights) stay trainable too. Left unset, freezing trainable adapter
    weights warns.
    ``expert_neurons`` (a list over the MoE layers of lists over experts of int64 index tensors,
    or a ``NeuronSet`` with expert indices and ``language``) does the same for the routed experts
    of a mixture-of-experts model: the selected rows of each expert's gate/up and columns of its
    down train as small parameters, the stacked expert weights stay frozen. ``neurons`` and
    ``expert_neurons`` may be given together (e.g. Qwen2-MoE: shared experts and routed experts).
    ``chunked_loss`` makes ``model(..., labels=...)`` use the memory-lean chunked LM-head loss.
    ``recompute`` ("none", "up" or "gate_up"; sparse training only) makes the sparse MLPs
    recompute those projections in backward instead of keeping them: less activation memory, one
    or two more GEMMs per layer.

    ``model`` may be wrapped (PEFT, DDP, ``torch.compile``, accelerate): the Hugging Face model
    inside is patched. Everything is checked before the model changes, and a patch that fails
    midway is rolled back: a failed ``patch`` leaves the model as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects a torch.nn.Module, got {type(model).__name__}")
    if keep_trainable is not None and not isinstance(keep_trainable, bool):
        raise TypeError(f"keep_trainable must be True, False or None, got {keep_trainable!r}")
    outer, model = model, unwrap(model)
    sparse = neurons is not None or expert_neurons is not None
    what = "patch(neurons=...)" if expert_neurons is None else "patch(expert_neurons=...)"
    if recompute is not None:
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
        if not sparse and not has_trainable_neurons(model):
            raise ValueError("recompute applies to sparse neuron training: pass neurons= as well")
    if keep_trainable is not None and not sparse:
        raise ValueError("keep_trainable applies to sparse neuron training: pass neurons= as well")
    if sparse:
        check_not_recording(model, what)
        check_can_add_parameters(outer, what)
        check_no_mlp_adapters(model, what)
        select(model, neurons, language, expert_neurons)  # raises on a bad selection, before any change
    if chunked_loss:
        check_chunked_loss(model)
    was_patched, had_loss = is_patched(model), has_chunked_loss(model)
    frozen_adapters = trainable_adapter_parameters(model) if sparse and not keep_trainable else []
    try:
        patch_mlps(model)
        if chunked_loss:
            install_chunked_loss(model)
        if sparse:
            set_trainable_neurons(model, neurons, language=language, recompute=recompute or "none",
                                  keep_trainable=bool(keep_trainable), expert_neurons=expert_neurons)
        elif recompute is not None:
            set_recompute(model, recompute)
    except BaseException:
        if not was_patched:
            unpatch(model)
        elif chunked_loss and not had_loss:
            uninstall_chunked_loss(model)
        raise
    if frozen_adapters and keep_trainable is None:
        warnings.warn(
            f"patch(neurons=...) froze {len(frozen_adapters)} trainable adapter parameters ({frozen_adapters[0]}, ...): "
            "only the neurons train now. Pass keep_trainable=True to train the adapter too, or keep_trainable=False "
            "to freeze it without this warning",
            stacklevel=2,
        )
    return outer
