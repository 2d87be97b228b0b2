"""Run Triton kernels on CPU (interpreter) when this machine has no CUDA; set before triton is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import sys

# shared test helpers (tests/helpers.py, tests/ops/kernel_tolerance.py) import by module name
# from every test folder
_TESTS = os.path.dirname(os.path.abspath(__file__))
for _dir in (_TESTS, os.path.join(_TESTS, "ops")):
    if _dir not in sys.path:
        sys.path.insert(0, _dir)
