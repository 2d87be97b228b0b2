"""Floating-point dtypes by name: the one table every room reads (kernels accept these dtypes,
files record them by name, the CLI parses them)."""
from __future__ import annotations

from typing import Dict

import torch

__all__ = ["FLOAT_DTYPES", "DTYPE_NAMES", "dtype_name", "dtype_from_name"]

#: canonical name -> dtype, for the dtypes the kernels compute in
FLOAT_DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: every accepted spelling -> dtype
DTYPE_NAMES: Dict[str, torch.dtype] = {**FLOAT_DTYPES, "fp32": torch.float32, "bf16": torch.bfloat16,
                                       "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` -> ``torch.bfloat16``; a ValueError naming the choices otherwise."""
    try:
        return DTYPE_NAMES[name]
    except (KeyError, TypeError):
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}") from None
