"""Train/validation splits from a hash: stable across runs, machines and languages.

Why a hash of the id rather than a random draw: a sentence and its translations share an id,
so they land in the same split in every language (validation sets are parallel), and adding
a language or rebuilding never moves a sentence from one split to the other.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

__all__ = ["dedup_and_split", "split_of"]


def split_of(source_id: str, val_fraction: float, seed: int = 0) -> str:
    """'train' or 'validation' from a hash of the source id: stable across runs, machines and
    languages (a sentence and its translations share a split)."""
    h = hashlib.sha256(f"{seed}\x00{source_id}".encode()).digest()
    return "validation" if int.from_bytes(h[:8], "big") / 2.0**64 < val_fraction else "train"


def dedup_and_split(rows: Iterable[tuple[str, str, str]], val_fraction: float,
                    seed: int) -> dict[str, list[dict]]:
    """rows (source, uid, text) -> {'train': [...], 'validation': [...]} of dicts; the first row
    (in sorted id order) of each distinct text is kept."""
    seen: set[str] = set()
    splits: dict[str, list] = {"train": [], "validation": []}
    for source, uid, text in sorted(rows):
        if text in seen:
            continue
        seen.add(text)
        sid = f"{source}:{uid}"
        splits[split_of(sid, val_fraction, seed)].append({"text": text, "id": sid, "source": source})
    return splits
