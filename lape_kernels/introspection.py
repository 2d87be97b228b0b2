"""Model introspection: which Hugging Face models have a gated MLP we compute, and where its
pieces are (decoder layers, the MLP's weights and biases, the activation, the model's shape).

Pure functions of a model or config: no state is kept and nothing is changed here. Patching,
statistics, identification and training all read a model through this module, so each of those
facts has one owner.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

__all__ = [
    "UnsupportedModelError",
    "MLPFamily",
    "FAMILIES",
    "ACTIVATIONS",
    "supported_model_types",
    "family_for",
    "activation_for",
    "text_config",
    "decoder_layers",
    "decoder_body",
    "model_shape",
    "MLPShape",
    "mlp_shape",
    "model_type",
]


class UnsupportedModelError(ValueError):
    """The model has no gated MLP family we know how to patch."""


@dataclass(frozen=True)
class MLPFamily:
    """How one model family's MLP is found and computed."""

    name: str
    model_types: Tuple[str, ...]
    # config attributes holding the activation name, in order of preference
    activation_attrs: Tuple[str, ...] = ("hidden_act",)
    # Phi-3 style: one ``gate_up_proj`` whose output is [gate | up] along the last dim
    fused_gate_up: bool = False

    def check(self, mlp: nn.Module) -> None:
        """Raise ``UnsupportedModelError`` unless ``mlp`` has this family's Linear layers."""
        names = ("gate_up_proj", "down_proj") if self.fused_gate_up else ("gate_proj", "up_proj", "down_proj")
        missing = [n for n in names if not isinstance(getattr(mlp, n, None), nn.Linear)]
        if missing:
            raise UnsupportedModelError(
                f"{type(mlp).__name__} is not a gated MLP of family {self.name!r}: missing nn.Linear {missing}"
            )

    def gate_up(self, mlp: nn.Module, x2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """gate and up projections of ``x2`` [T, H] through the module's own Linear layers."""
        if self.fused_gate_up:
            return mlp.gate_up_proj(x2).chunk(2, dim=-1)
        return mlp.gate_proj(x2), mlp.up_proj(x2)

    def weights(self, mlp: nn.Module) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Wg [I, H], Wu [I, H], Wd [H, I]) as views of the module's weights."""
        if self.fused_gate_up:
            wg, wu = mlp.gate_up_proj.weight.chunk(2, dim=0)
            return wg, wu, mlp.down_proj.weight
        return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight

    def biases(self, mlp: nn.Module) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(bg [I], bu [I], bd [H]), each None when the Linear has no bias."""
        if self.fused_gate_up:
            b = mlp.gate_up_proj.bias
            bg, bu = (None, None) if b is None else b.chunk(2, dim=0)
            return bg, bu, mlp.down_proj.bias
        return mlp.gate_proj.bias, mlp.up_proj.bias, mlp.down_proj.bias


FAMILIES: Dict[str, MLPFamily] = {}


def _register(family: MLPFamily) -> None:
    for t in family.model_types:
        FAMILIES[t] = family


_GEMMA_ACT = ("hidden_activation", "hidden_act")
_register(MLPFamily("llama", ("llama",)))
_register(MLPFamily("mistral", ("mistral",)))
_register(MLPFamily("qwen2", ("qwen2",)))
_register(MLPFamily("qwen3", ("qwen3",)))
_register(MLPFamily("gemma", ("gemma",), activation_attrs=_GEMMA_ACT))
_register(MLPFamily("gemma2", ("gemma2",), activation_attrs=_GEMMA_ACT))
_register(MLPFamily("gemma3", ("gemma3", "gemma3_text"), activation_attrs=_GEMMA_ACT))
_register(MLPFamily("phi3", ("phi3",), fused_gate_up=True))

#: transformers activation names -> our kernels' activation names
ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu": "gelu",
}


def supported_model_types() -> List[str]:
    return sorted(FAMILIES)


def model_type(model_or_config: Any) -> Optional[str]:
    """The top-level ``config.model_type`` (e.g. ``gemma3`` for multimodal Gemma 3)."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None)


def text_config(model_or_config: Any) -> Any:
    """The language model's config (multimodal Gemma 3 nests it under ``text_config``)."""
    config = getattr(model_or_config, "config", model_or_config)
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        return get_text()
    nested = getattr(config, "text_config", None)
    return nested if nested is not None else config


def family_for(model: nn.Module) -> MLPFamily:
    mt = model_type(model)
    family = FAMILIES.get(mt)
    if family is None:
        raise UnsupportedModelError(
            f"lape_kernels cannot patch model_type {mt!r}: supported families are "
            f"{', '.join(supported_model_types())} (gated FFN: gate_proj/up_proj/down_proj or Phi-3's gate_up_proj)"
        )
    return family


def activation_for(family: MLPFamily, config: Any) -> str:
    """Our kernel activation name for the model's configured MLP activation."""
    for attr in family.activation_attrs:
        name = getattr(config, attr, None)
        if name:
            if name not in ACTIVATIONS:
                raise UnsupportedModelError(
                    f"activation {name!r} (config.{attr}) is not supported; supported: {sorted(ACTIVATIONS)}"
                )
            return ACTIVATIONS[name]
    raise UnsupportedModelError(f"config has none of {family.activation_attrs}: cannot tell the MLP activation")


def decoder_layers(model: nn.Module) -> Tuple[nn.Module, nn.ModuleList]:
    """(decoder body, its ``layers`` ModuleList): the first ModuleList named ``layers`` whose
    blocks own a gated ``mlp`` (else the first whose blocks own any ``mlp``, so that
    ``MLPFamily.check`` names what is missing). The body is where the attention mask arrives.

    Gated first: multimodal models (Gemma 3) list a vision tower whose encoder ``layers`` have
    plain ``fc1``/``fc2`` MLPs before the language model."""
    candidates = []
    for _, module in model.named_modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0 and hasattr(layers[0], "mlp"):
            candidates.append((module, layers))
    for module, layers in candidates:
        mlp = layers[0].mlp
        if hasattr(mlp, "gate_proj") or hasattr(mlp, "gate_up_proj"):
            return module, layers
    if candidates:
        return candidates[0]
    raise UnsupportedModelError(
        f"{type(model).__name__} has no decoder layers with a gated MLP (looked for a `layers` ModuleList of blocks with `.mlp`)"
    )


def decoder_body(model: nn.Module) -> nn.Module:
    return decoder_layers(model)[0]


def model_shape(model_or_config: Any) -> Tuple[int, int]:
    """(num_hidden_layers, intermediate_size) of a HF model or config (its text config): what a
    model is declared to be, e.g. to check a neuron set against a config before any weight
    exists. :func:`mlp_shape` reads a model's actual MLP weights."""
    config = text_config(model_or_config)
    try:
        num_layers = int(config.num_hidden_layers)
        inter = config.intermediate_size
    except AttributeError as exc:
        raise TypeError(f"cannot read num_hidden_layers / intermediate_size from {type(config).__name__}") from exc
    if isinstance(inter, (list, tuple)):  # some configs list a per-layer size
        if len(set(inter)) != 1:
            raise ValueError(f"per-layer intermediate sizes differ ({sorted(set(inter))}); not supported")
        inter = inter[0]
    return num_layers, int(inter)


class MLPShape(NamedTuple):
    """A model's gated MLPs as its weights are: the shape every neuron index refers to."""

    num_layers: int
    hidden_size: int
    intermediate_size: int


def mlp_shape(model: nn.Module) -> MLPShape:
    """(layers, hidden, intermediate) read from the MLP weights of every decoder layer (patched
    or not). Layers of different MLP sizes are an error: statistics, neuron sets and trainable
    slices are [layers, intermediate] arrays."""
    family = family_for(model)
    _, layers = decoder_layers(model)
    sizes = set()
    for layer in layers:
        family.check(layer.mlp)
        sizes.add(tuple(family.weights(layer.mlp)[0].shape))
    if len(sizes) != 1:
        raise ValueError(f"the MLPs of {type(model).__name__} differ in size ([intermediate, hidden] = "
                         f"{sorted(sizes)}): one intermediate size for all layers is needed")
    intermediate, hidden = sizes.pop()
    return MLPShape(len(layers), int(hidden), int(intermediate))
