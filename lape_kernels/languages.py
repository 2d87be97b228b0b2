"""Language names: the one check that a list of language names is usable (every room that
takes languages calls it, so the rules and messages are the same everywhere)."""
from __future__ import annotations

from typing import Any, List

__all__ = ["check_languages"]


def check_languages(languages: Any) -> List[str]:
    if isinstance(languages, str) or not isinstance(languages, (list, tuple)):
        raise TypeError(f"languages must be a list of language names, got {type(languages).__name__}")
    languages = list(languages)
    if not languages:
        raise ValueError("languages must not be empty")
    bad = [l for l in languages if not isinstance(l, str) or not l]
    if bad:
        raise TypeError(f"language names must be non-empty strings, got {bad}")
    dup = sorted({l for l in languages if languages.count(l) > 1})
    if dup:
        raise ValueError(f"duplicate languages: {dup}")
    return languages

