"""Language names: the one check that a list of language names is usable (statistics, neuron
sets and identification call it, so the rules and messages are the same everywhere)."""
from __future__ import annotations

from typing import Any, List

__all__ = ["check_languages"]


def check_languages(languages: Any) -> List[str]:
    """``languages`` as a new list: a non-empty list or tuple of distinct, non-empty strings.

    A wrong type (not a list, a name that is not a string) is a TypeError; an empty list, an
    empty name or a repeated one a ValueError."""
    if isinstance(languages, str) or not isinstance(languages, (list, tuple)):
        raise TypeError(f"languages must be a list of language names, got {type(languages).__name__}")
    languages = list(languages)
    if not languages:
        raise ValueError("languages must not be empty")
    bad = [l for l in languages if not isinstance(l, str)]
    if bad:
        raise TypeError(f"language names must be non-empty strings, got {bad}")
    if "" in languages:
        raise ValueError(f"language names must be non-empty strings, got {languages}")
    dup = sorted({l for l in languages if languages.count(l) > 1})
    if dup:
        raise ValueError(f"duplicate language names: {dup}")
    return languages

