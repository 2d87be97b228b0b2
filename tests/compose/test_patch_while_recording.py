"""Patching a model that is being recorded is an error (its statistics would silently mix
computations: ``n_tokens`` growing while ``over_zero`` stops), and a failed ``patch`` leaves the
model exactly as it was."""
from __future__ import annotations

import pytest
import torch

import lape_kernels as lk
from lape_kernels import api
from lape_kernels.testing import random_batch, random_neurons, tiny_model

NEURONS = random_neurons(3, 128, 4, seed=2)


def snapshot(model):
    """Everything patching may touch: each module's own attributes and hooks, the parameters'
    values and flags, the buffers."""
    modules = {}
    for name, m in model.named_modules():
        attrs = {k: v for k, v in m.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")}
        modules[name] = (
            sorted(attrs), sorted(m._parameters), sorted(m._buffers),
            [(k, id(v)) for k, v in m.__dict__.items() if k == "forward"],
            list(m._forward_pre_hooks), list(m._forward_hooks),
        )
    params = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    return modules, params


def assert_same(model, before):
    modules, params = snapshot(model)
    assert modules == before[0]
    assert params.keys() == before[1].keys()
    for n, (v, flag) in params.items():
        assert torch.equal(v, before[1][n][0]) and flag == before[1][n][1], n


@pytest.mark.parametrize("patched_first", [False, True])
def test_unpatch_and_patch_with_neurons_inside_record_are_errors(patched_first):
    model = tiny_model("llama")
    if patched_first:
        lk.patch(model)
    ids, mask = random_batch(padding="left")
    with torch.no_grad(), lk.record(model) as stats:
        model(input_ids=ids, attention_mask=mask)
        for change in (lambda: lk.unpatch(model), lambda: lk.patch(model, neurons=NEURONS),
                       lambda: lk.merge(model)):
            with pytest.raises(RuntimeError, match=r"being recorded|no trainable neurons"):
                change()
        lk.patch(model)  # nothing new: recording goes on
        model(input_ids=ids, attention_mask=mask)
    assert stats.n_tokens == 2 * int(mask.sum())
    one = lk.record(model)
    with torch.no_grad(), one as single:
        model(input_ids=ids, attention_mask=mask)
    assert torch.equal(stats.over_zero, 2 * single.over_zero)  # counting never stopped
    assert lk.is_patched(model) == patched_first


def _model_with_foreign_forward(where="model"):
    model = tiny_model("llama")
    module = model if where == "model" else model.model.layers[1].mlp
    module.forward = module.forward  # someone else's instance forward: patching would replace it
    return model


@pytest.mark.parametrize("case", ["bad neurons", "foreign forward", "foreign MLP forward",
                                  "fails while training is set up", "patched, fails while training is set up",
                                  "bad recompute"])
def test_a_failed_patch_leaves_the_model_as_it_was(case, monkeypatch):
    if case.startswith("foreign"):
        model = _model_with_foreign_forward("model" if case == "foreign forward" else "mlp")
    else:
        model = tiny_model("llama")
    kwargs = {"neurons": NEURONS}
    if case == "bad neurons":
        kwargs = {"neurons": NEURONS[:2]}
    elif case.startswith("foreign"):
        kwargs = {}
    elif case == "bad recompute":
        kwargs = {"neurons": NEURONS, "recompute": "all"}
    if case.startswith("patched"):
        lk.patch(model, chunked_loss=False)
    if "training is set up" in case:
        def broken(*args, **kw):
            raise KeyboardInterrupt  # any failure, even an interrupt
        monkeypatch.setattr(api, "set_trainable_neurons", broken)
    before = snapshot(model)
    with pytest.raises((ValueError, RuntimeError, KeyboardInterrupt)):
        lk.patch(model, **kwargs)
    assert_same(model, before)
