"""Test-only helpers. The shared oracles (tiny models, the LAPE hook counter, slice training)
live in ``lape_kernels.testing``, where the benchmarks and examples use them too."""
from __future__ import annotations

from typing import Callable, Sequence

import pytest
import torch

from lape_kernels.testing import TINY_FAMILIES

#: the dtypes model-level tests run in, by the short names used in test ids
MODEL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def over_families_dtypes_paddings(paddings: Sequence) -> Callable:
    """Parametrize a test over every family x ``MODEL_DTYPES`` x ``paddings`` (arguments
    ``family``, ``dtype`` (a short name), ``padding``)."""

    def decorate(test: Callable) -> Callable:
        test = pytest.mark.parametrize("family", TINY_FAMILIES)(test)
        test = pytest.mark.parametrize("dtype", list(MODEL_DTYPES))(test)
        return pytest.mark.parametrize("padding", list(paddings))(test)

    return decorate
