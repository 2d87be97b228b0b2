"""Run Triton kernels on CPU (interpreter) when this machine has no CUDA; set before triton is imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import sys

# test-only helpers (tests/helpers.py, tests/ops/kernel_tolerance.py) import by module name
# from every test folder
_TESTS = os.path.dirname(os.path.abspath(__file__))
for _dir in (_TESTS, os.path.join(_TESTS, "ops")):
    if _dir not in sys.path:
        sys.path.insert(0, _dir)


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test starts from the same global torch RNG state, whatever ran before it (the
    tiny models leave the global RNG alone)."""
    torch.manual_seed(0)
    yield
