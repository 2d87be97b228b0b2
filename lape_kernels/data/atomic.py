"""The JSON format of the data caches (UTF-8, sorted keys), written all-or-nothing through
``lape_kernels.files`` (the one implementation of atomic writes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..files import atomic_dir, write_atomic

__all__ = ["atomic_dir", "write_json_atomic"]


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as UTF-8 JSON (sorted keys) to ``path`` all-or-nothing."""
    write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=True))
