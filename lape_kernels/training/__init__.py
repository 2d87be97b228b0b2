"""Sparse language-neuron fine-tuning: the sparse MLP autograd, the chunked LM loss, and
save / load / merge of the trained neurons (see docs/ARCHITECTURE.md)."""
from __future__ import annotations

from .io import load_neurons, merge, save_neurons
from .loss import chunked_causal_lm_loss, install_chunked_loss, uninstall_chunked_loss
from .sparse_mlp import (
    RECOMPUTE_MODES,
    clear_trainable_neurons,
    set_recompute,
    set_trainable_neurons,
    sparse_mlp_forward,
    trainable_parameters,
)

__all__ = [
    "merge",
    "save_neurons",
    "load_neurons",
    "trainable_parameters",
    "set_trainable_neurons",
    "clear_trainable_neurons",
    "set_recompute",
    "RECOMPUTE_MODES",
    "sparse_mlp_forward",
    "install_chunked_loss",
    "uninstall_chunked_loss",
    "chunked_causal_lm_loss",
]
