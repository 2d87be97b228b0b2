"""Which of our kernels' activations (``silu``, ``gelu_tanh``, ``gelu``) an MLP's activation
*instance* computes.

Read from the module object, not from the config's name: the config says what the author meant,
the instance is what runs (a config name can map to a Python formula, a clipped variant, or a
class a model defines for itself). Only activations whose ATen formula our kernels reproduce are
mapped; anything else is an error naming the class, never a silent approximation.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch.nn.functional as F
from torch import nn

__all__ = ["KERNEL_ACTIVATIONS", "kernel_activation", "UnknownActivation"]

#: the activations our kernels compute (``lape_kernels.kernels.reference.ACTIVATIONS``)
KERNEL_ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


class UnknownActivation(ValueError):
    """The activation is not one our kernels compute; the message names it and says why."""


def _from_function(fn: Any) -> Optional[str]:
    """silu / gelu / gelu_tanh for ATen's functional forms (also ``functools.partial`` of them)."""
    if fn is F.silu:
        return "silu"
    if fn is F.gelu:
        return "gelu"
    if isinstance(fn, functools.partial) and fn.func is F.gelu and not fn.args:
        approximate = fn.keywords.get("approximate", "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
    return None


def _describe(act: Any) -> str:
    if isinstance(act, nn.Module):
        return type(act).__name__
    return getattr(act, "__qualname__", None) or getattr(act, "__name__", None) or type(act).__name__


def _transformers_activations():
    """transformers' activation classes that are exactly an ATen function (None: not installed)."""
    try:
        from transformers import activations
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return activations


def kernel_activation(act: Any) -> str:
    """Our kernel's name for the activation module or function ``act``; ``UnknownActivation``
    (naming it) when our kernels do not compute exactly that function."""
    name = _from_function(act)
    if name is not None:
        return name
    if not isinstance(act, nn.Module):
        raise UnknownActivation(f"activation {_describe(act)} is not one of our kernels' ({', '.join(KERNEL_ACTIVATIONS)})")
    cls = type(act)
    if cls is nn.SiLU:
        return "silu"
    if cls is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}[act.approximate]
    hf = _transformers_activations()
    if hf is not None:
        if cls is getattr(hf, "SiLUActivation", None):
            return "silu"
        # GELUActivation / GELUTanh hold the function they apply in ``.act``
        if cls in (getattr(hf, "GELUActivation", None), getattr(hf, "GELUTanh", None)):
            inner = _from_function(getattr(act, "act", None))
            if inner is not None:
                return inner
            raise UnknownActivation(
                f"activation {cls.__name__} evaluates a Python formula ({_describe(getattr(act, 'act', None))}), "
                "not ATen's: our kernels would not reproduce it bit for bit"
            )
        if cls is getattr(hf, "NewGELUActivation", None):
            raise UnknownActivation(
                "activation NewGELUActivation is GELU-tanh written as a Python formula, not ATen's: our kernels "
                "would not reproduce it bit for bit"
            )
    raise UnknownActivation(
        f"activation {cls.__name__} ({cls.__module__}) is not one of our kernels' ({', '.join(KERNEL_ACTIVATIONS)})"
    )
