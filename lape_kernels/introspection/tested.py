"""Which model types the test matrix proves: read from ``coverage.json``, which
``scripts/coverage_matrix.py`` generates from transformers itself (and the README table with it)."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Dict, List

__all__ = ["COVERAGE_FILE", "coverage", "supported_model_types"]

COVERAGE_FILE = Path(__file__).with_name("coverage.json")


@functools.lru_cache(maxsize=1)
def _load() -> Dict[str, Dict[str, str]]:
    data = json.loads(COVERAGE_FILE.read_text())
    return data["model_types"]


def coverage() -> Dict[str, Dict[str, str]]:
    """model_type -> {"status": "supported" | "refused" | "untestable", "reason": ...} for every
    causal-LM type of the transformers version the matrix ran on."""
    return {k: dict(v) for k, v in _load().items()}


def supported_model_types() -> List[str]:
    """Model types whose tiny models pass the whole test matrix (patched logits bit-identical,
    counts, sparse training, merge, unpatch). Others may still work: ``check_model(model)``."""
    return sorted(k for k, v in _load().items() if v["status"] == "supported")
