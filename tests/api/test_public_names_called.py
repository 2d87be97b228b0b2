"""Every name in ``lape_kernels.__all__``, looked up twice and called twice through
``import lape_kernels as lk`` in a fresh interpreter (import order is real there), also after
every submodule was imported first. A new public name without a call here fails the test."""
from __future__ import annotations

import subprocess
import sys

import pytest

_CALLS = r'''
import importlib, pkgutil, sys, tempfile
from pathlib import Path
import lape_kernels
if IMPORT_ALL_FIRST:
    for info in pkgutil.walk_packages(lape_kernels.__path__, "lape_kernels."):
        # per-ISA CPU kernel libraries: _C loads the one this CPU runs (an avx512 one dies with
        # SIGILL on an avx2-only CPU, and a second one would register the kernels twice)
        if not info.name.startswith("lape_kernels._cpu_"):
            importlib.import_module(info.name)
import torch
import lape_kernels as lk
from lape_kernels.testing import random_batch, random_neurons, tiny_model

work = Path(tempfile.mkdtemp())
ids, mask = random_batch(padding="right")
neurons = random_neurons(3, 128, 2)
counts = {"a": {"n": 10, "over_zero": torch.tensor([[1, 9, 5]])}, "b": {"n": 10, "over_zero": torch.tensor([[9, 1, 5]])}}


def trained(seed=0):
    model = lk.patch(tiny_model("llama", seed=seed), neurons=neurons)
    return model


def record():
    model = tiny_model("llama")
    with torch.no_grad(), lk.record(model, ["en", "cy"]) as stats:
        stats.set_batch_languages(torch.tensor([0, 1, -1]))
        model(ids, attention_mask=mask)
    return stats


def deactivate():
    model = tiny_model("llama")
    with torch.no_grad(), lk.deactivate(model, neurons):
        return model(ids, attention_mask=mask).logits


def save_neurons():
    return lk.save_neurons(trained(), work / "saved")


def load_neurons():
    save_neurons()
    return lk.trainable_parameters(lk.load_neurons(tiny_model("llama"), work / "saved"))


CALLS = {
    "ActivationStats": lambda: lk.ActivationStats(torch.tensor([[1, 2]]), None, 3).activation_probability(),
    "ModelMismatchError": lambda: str(lk.ModelMismatchError("x")),
    "NeuronSet": lambda: lk.NeuronSet({"a": [torch.tensor([1])]}, 1, 4).total("a"),
    "StatsByLanguage": lambda: list(lk.StatsByLanguage(["a"], {"a": lk.ActivationStats(torch.tensor([[1]]), None, 1)})),
    "UnsupportedModelError": lambda: str(lk.UnsupportedModelError("x")),
    "check_model": lambda: str(lk.check_model(tiny_model("llama"))),
    "deactivate": deactivate,
    "identify": lambda: lk.identify(counts, top_rate=0.5),
    "is_patched": lambda: lk.is_patched(tiny_model("llama")),
    "load_neurons": load_neurons,
    "merge": lambda: lk.is_patched(lk.merge(trained())),
    "model_fingerprint": lambda: lk.model_fingerprint(tiny_model("llama")),
    "ops": lambda: lk.ops.act_mul(torch.ones(2, 3), torch.ones(2, 3), "silu"),
    "patch": lambda: lk.is_patched(lk.patch(tiny_model("llama"))),
    "record": lambda: record()["cy"].n_tokens,
    "reference": lambda: lk.reference.act_mul(torch.ones(2, 3), torch.ones(2, 3), "silu"),
    "save_neurons": save_neurons,
    "supported_model_types": lambda: lk.supported_model_types(),
    "trainable_parameters": lambda: len(lk.trainable_parameters(trained())),
    "unpatch": lambda: lk.is_patched(lk.unpatch(lk.patch(tiny_model("llama")))),
}
missing = sorted(set(lk.__all__) - set(CALLS))
assert not missing, f"public names without a call in this test: {missing}"
assert not set(CALLS) - set(lk.__all__), sorted(set(CALLS) - set(lk.__all__))


def same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


for name in lk.__all__:
    assert getattr(lk, name) is getattr(lk, name), name
    first, second = CALLS[name](), CALLS[name]()
    assert same(first, second), (name, first, second)
print("ok", len(CALLS))
'''


@pytest.mark.parametrize("import_all_first", [False, True])
def test_every_public_name_looked_up_twice_and_called_twice(import_all_first):
    code = _CALLS.replace("IMPORT_ALL_FIRST", str(import_all_first))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().startswith("ok ")
