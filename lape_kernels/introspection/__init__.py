"""Model introspection: which Hugging Face models have a gated MLP we compute, and where its
pieces are (decoder layers, the MLP's weights and biases, the activation, the model's shape).

Pure functions of a model or config: no state is kept and nothing is changed here. Patching,
statistics, identification and training all read a model through this package, so each of those
facts has one owner. ``discovery`` finds MLPs by structure and proves them by probing;
``registry`` holds explicit overrides; ``tested`` reports what the test matrix proved.
"""
from __future__ import annotations

from .activations import KERNEL_ACTIVATIONS, UnknownActivation, kernel_activation
from .tested import COVERAGE_FILE, coverage, supported_model_types
from .discovery import (HOW_TO_CHECK, Discovery, GatedMLP, MLPShape, decoder_body, decoder_layers, discover,
                        expert_shape, family_for, mlp_modules, mlp_shape)
from .experts import EXPERTS_IMPLEMENTATIONS, ExpertShape, ExpertsFFN, expert_weights, experts_implementation
from .family import FUSED_LAYOUTS, MLPFamily, UnsupportedModelError
from .model import model_shape, model_type, text_config
from .registry import FAMILIES, family_override, register_family

__all__ = [
    "UnsupportedModelError",
    "MLPFamily",
    "FUSED_LAYOUTS",
    "FAMILIES",
    "register_family",
    "family_override",
    "KERNEL_ACTIVATIONS",
    "UnknownActivation",
    "kernel_activation",
    "GatedMLP",
    "Discovery",
    "discover",
    "check_model",
    "HOW_TO_CHECK",
    "supported_model_types",
    "coverage",
    "COVERAGE_FILE",
    "family_for",
    "mlp_modules",
    "text_config",
    "decoder_layers",
    "decoder_body",
    "model_shape",
    "MLPShape",
    "mlp_shape",
    "model_type",
    "ExpertsFFN",
    "ExpertShape",
    "expert_shape",
    "expert_weights",
    "experts_implementation",
    "EXPERTS_IMPLEMENTATIONS",
]


def check_model(model) -> Discovery:
    """Whether ``lape_kernels.patch`` computes ``model`` exactly, without changing it: returns what
    was found (print it) or raises ``UnsupportedModelError`` saying why not. Runs each MLP's own
    forward once on a small random input (the proof that it is ``down(act(gate) * up)``)."""
    return discover(model, probe=True)
