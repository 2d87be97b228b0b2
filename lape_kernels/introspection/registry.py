"""Explicit families, for models that discovery by structure cannot read (or reads ambiguously).

Discovery (``discovery.py``) finds every gated MLP whose structure is plain; an entry here only
names the pieces (``MLPFamily``) for a ``model_type`` and is still checked by the same probe:
an override can say where gate, up and down are, never that something else is our math.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from .family import MLPFamily
from .model import model_type, text_config

__all__ = ["FAMILIES", "register_family", "family_override"]

#: model_type -> explicit family (empty by default: every tested type is found by structure)
FAMILIES: Dict[str, MLPFamily] = {}


def register_family(family: MLPFamily) -> MLPFamily:
    """Use ``family`` for every model whose ``model_type`` is in ``family.model_types``."""
    if not isinstance(family, MLPFamily):
        raise TypeError(f"register_family expects an MLPFamily, got {type(family).__name__}")
    if not family.model_types:
        raise ValueError(f"family {family.name!r} names no model_types to apply to")
    for t in family.model_types:
        FAMILIES[t] = family
    return family


def family_override(model: Any) -> Optional[MLPFamily]:
    """The registered family for the model's type (its own, else its text config's), if any."""
    for mt in (model_type(model), getattr(text_config(model), "model_type", None)):
        if mt is not None and mt in FAMILIES:
            return FAMILIES[mt]
    return None
