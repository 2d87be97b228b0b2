"""``import lape_kernels as lk``: every public name is one object, whatever was imported
before (each check runs in a fresh interpreter, where import order is real)."""
from __future__ import annotations

import subprocess
import sys

import pytest

_CHECK = r'''
import importlib, pkgutil, types
import lape_kernels
if IMPORT_ALL_FIRST:
    for info in pkgutil.walk_packages(lape_kernels.__path__, "lape_kernels."):
        # per-ISA CPU kernel libraries: _C loads the one this CPU runs (an avx512 one dies with
        # SIGILL on an avx2-only CPU, and a second one would register the kernels twice)
        if not info.name.startswith("lape_kernels._cpu_"):
            importlib.import_module(info.name)
import lape_kernels as lk
for name in lk.__all__:
    first, second = getattr(lk, name), getattr(lk, name)
    assert first is second, name
    # only the kernel modules are modules; every other public name is what the README calls
    assert isinstance(first, types.ModuleType) == (name in ("ops", "reference")), name
import torch
stats = {"a": {"n": 10, "over_zero": torch.tensor([[1, 9, 5]])}, "b": {"n": 10, "over_zero": torch.tensor([[9, 1, 5]])}}
assert lk.identify(stats, top_rate=0.5) == lk.identify(stats, top_rate=0.5)
print("ok", len(lk.__all__))
'''


@pytest.mark.parametrize("import_all_first", [False, True])
def test_public_names_are_stable_in_a_fresh_interpreter(import_all_first):
    code = _CHECK.replace("IMPORT_ALL_FIRST", str(import_all_first))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok ")


def test_no_submodule_is_named_like_a_public_name():
    import pkgutil

    import lape_kernels

    modules = {info.name.rsplit(".", 1)[-1] for info in pkgutil.walk_packages(lape_kernels.__path__, "lape_kernels.")}
    assert modules & set(lape_kernels.__all__) <= {"ops", "reference"}
