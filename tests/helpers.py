"""Test-only helpers. The shared oracles (tiny models, the LAPE hook counter, slice training)
live in ``lape_kernels.testing``, where the benchmarks and examples use them too."""
from __future__ import annotations

from typing import Callable, Sequence

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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


class WeightShapeSpy(TorchDispatchMode):
    """Records every op output that has one of ``shapes`` (a weight's) or at least ``min_numel``
    elements and is not the storage of an existing tensor (``known``: storage data pointers):
    the proof that a training step allocates no tensor of a frozen weight's shape."""

    def __init__(self, shapes, min_numel: int, known) -> None:
        super().__init__()
        self.shapes, self.min_numel, self.known, self.hits = {tuple(s) for s in shapes}, min_numel, known, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (tuple(t.shape) in self.shapes or t.numel() >= self.min_numel):
                if t.untyped_storage().data_ptr() not in self.known:
                    self.hits.append((str(func), tuple(t.shape)))
        return out
