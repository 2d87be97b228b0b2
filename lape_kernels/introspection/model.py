"""Facts about a whole model or its config: its type, its language model's config, its shape."""
from __future__ import annotations

from typing import Any, Optional, Tuple

__all__ = ["model_type", "text_config", "model_shape"]


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
