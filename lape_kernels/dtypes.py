"""Floating-point dtypes by name: the one table every room reads (kernels accept these dtypes,
files record them by name, the CLI and the benchmarks parse them)."""
from __future__ import annotations

from typing import Dict

import torch

__all__ = ["FLOAT_DTYPES", "SHORT_DTYPE_NAMES", "DTYPE_NAMES", "dtype_name", "dtype_from_name"]

#: canonical name -> dtype, for the dtypes the kernels compute in (files record these names)
FLOAT_DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: the short spellings command lines take
SHORT_DTYPE_NAMES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: every accepted spelling -> dtype
DTYPE_NAMES: Dict[str, torch.dtype] = {**FLOAT_DTYPES, **SHORT_DTYPE_NAMES}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` -> ``torch.bfloat16``; a ValueError naming the choices otherwise."""
    try:
        return DTYPE_NAMES[name]
    except (KeyError, TypeError):
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}") from None
