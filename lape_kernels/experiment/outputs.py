"""Outputs the experiment writes: built under a temporary name, renamed into place when
complete, so a failed command never leaves a half-written output at the path it was given.

Also the JSON the outputs are written in, and the settings hash that names a result (a rerun
with the same hash reuses it, a resume refuses a different one).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from ..dtypes import dtype_name
from ..files import publish, remove_path, write_atomic  # the one all-or-nothing writer
from .errors import ExperimentError

__all__ = ["partial_path", "remove_path", "publish", "write_atomic", "dumps", "write_json_atomic", "read_json",
           "config_hash"]


def partial_path(path: Union[str, Path]) -> Path:
    """Where an output is built before it is renamed into place (hidden sibling; also the
    resume state of an interrupted ``collect`` / ``finetune``)."""
    path = Path(path)
    return path.parent / f".{path.name}.partial"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, torch.dtype):
        return dtype_name(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default, allow_nan=True) + "\n"


def write_json_atomic(path: Union[str, Path], obj: Any) -> Path:
    return write_atomic(path, dumps(obj))


def read_json(path: Union[str, Path]) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExperimentError(f"{path} does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ExperimentError(f"{path}: cannot read JSON: {exc}") from None


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable hash of the settings that determine a result (resume refuses a different one)."""
    text = json.dumps(config, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
