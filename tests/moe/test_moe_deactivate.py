"""deactivate() on expert neurons, against an independent reference: a copy of the model (never
patched) whose deactivated neurons' columns of the expert's down weights (and, for a shared
expert, of its down_proj) are zero. A zero column removes the neuron's contribution exactly as
zeroing its activation does, so the logits must be bit-identical (float32)."""
from __future__ import annotations

import copy

import pytest
import torch

import lape_kernels as lk
from lape_kernels import patching
from lape_kernels.introspection import discover, expert_shape
from lape_kernels.testing import TINY_MOE_FAMILIES, random_batch, random_expert_neurons, random_neurons, tiny_model

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _zeroed_copy(model, experts=None, dense=None):
    """The reference: an unpatched copy with the neurons' down columns zeroed."""
    ref = copy.deepcopy(model)
    found = discover(ref, probe=False)
    with torch.no_grad():
        for x, per_expert in zip(found.experts, experts or []):
            for e, idx in enumerate(per_expert):
                x.module.down_proj[e][:, idx] = 0  # down_proj [E, H, I]
        for m, idx in zip(found.mlps, dense or []):
            m.family.weights(m.module)[2][:, idx] = 0  # Wd [H, I]
    return ref


@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_deactivated_expert_neurons_equal_zeroed_down_columns(family, impl):
    model = tiny_model(family, num_layers=2, experts_implementation=impl)
    ids, mask = random_batch(3, 10, seed=4, padding="left")
    shape = expert_shape(model)
    experts = random_expert_neurons(len(shape.layers), shape.num_experts, shape.intermediate_size, k=6, seed=1)
    experts[1][2] = torch.empty(0, dtype=torch.int64)  # an expert with nothing deactivated
    base = _logits(model, ids, mask)
    want = _logits(_zeroed_copy(model, experts), ids, mask)
    assert not torch.equal(want, base)
    with lk.deactivate(model, expert_neurons=experts):  # unpatched: patched for the block
        assert patching.is_patched(model)
        got = _logits(model, ids, mask)
    assert not patching.is_patched(model)
    assert torch.equal(got, want), (family, impl, (got - want).abs().max())
    assert torch.equal(_logits(model, ids, mask), base)


def test_neuron_set_with_shared_expert_and_experts_nested_blocks():
    """Qwen2-MoE: (NeuronSet, lang) deactivates the dense (shared-expert) and the expert neurons;
    nested blocks add up and each exit restores what was there."""
    model = tiny_model("qwen2_moe", num_layers=2)
    lk.patch(model)
    ids, mask = random_batch(2, 9, seed=5, padding="right")
    shape = expert_shape(model)
    dense = random_neurons(2, 48, k=5, seed=2)
    experts = random_expert_neurons(2, shape.num_experts, shape.intermediate_size, k=4, seed=3)
    ns = lk.NeuronSet({"mt": dense}, 2, 48, experts={"mt": experts},
                      expert_layout=(shape.layers, shape.num_experts, shape.intermediate_size),
                      model_fingerprint=lk.model_fingerprint(model))
    want = _logits(_zeroed_copy(model, experts, dense), ids, mask)
    with lk.deactivate(model, (ns, "mt")):
        assert torch.equal(_logits(model, ids, mask), want)
    more = random_expert_neurons(2, shape.num_experts, shape.intermediate_size, k=3, seed=9)
    union = [[torch.unique(torch.cat([a, b])) for a, b in zip(ra, rb)] for ra, rb in zip(experts, more)]
    want_union = _logits(_zeroed_copy(model, union, dense), ids, mask)
    want_more = _logits(_zeroed_copy(model, more), ids, mask)
    with lk.deactivate(model, expert_neurons=more):
        assert torch.equal(_logits(model, ids, mask), want_more)
        with lk.deactivate(model, (ns, "mt")):
            assert torch.equal(_logits(model, ids, mask), want_union)
        assert torch.equal(_logits(model, ids, mask), want_more)
    assert all(x._lape.deactivated is None for x in patching.patched_experts(model))
    assert all(m._lape.deactivated is None for m in patching.patched_mlps(model))
    with pytest.raises(RuntimeError, match="boom"), lk.deactivate(model, (ns, "mt")):
        raise RuntimeError("boom")
    assert all(x._lape.deactivated is None for x in patching.patched_experts(model))


def test_deactivation_does_not_change_counting():
    """record() inside deactivate counts the activations before they are zeroed, as the dense path."""
    model = tiny_model("qwen3_moe", num_layers=2)
    ids, mask = random_batch(2, 8, seed=6)
    shape = expert_shape(model)
    experts = random_expert_neurons(2, shape.num_experts, shape.intermediate_size, k=8, seed=4)
    with lk.record(model) as plain:
        model(input_ids=ids, attention_mask=mask)
    lk.patch(model)
    with lk.deactivate(model, expert_neurons=experts), lk.record(model) as stats:
        model(input_ids=ids, attention_mask=mask)
    # layer 0's inputs are untouched by the deactivation, so its counts are the plain ones
    assert torch.equal(stats.experts.over_zero[0], plain.experts.over_zero[0])
    assert torch.equal(stats.experts.routed[0], plain.experts.routed[0])


def test_bad_expert_neurons_are_clear_errors():
    model = tiny_model("mixtral", num_layers=2)
    shape = expert_shape(model)
    good = random_expert_neurons(2, shape.num_experts, shape.intermediate_size, k=2)
    cases = [
        (dict(), TypeError, "needs neurons .* and/or expert_neurons"),
        (dict(expert_neurons=good[:1]), ValueError, r"expert_neurons \(one entry per MoE layer \[0, 1\]\) has 1 entries, "
                                                    r"expected 2"),
        (dict(expert_neurons=[good[0][:3], good[1]]), ValueError, r"expert_neurons\[moe layer 0\] .* has 3 entries"),
        (dict(expert_neurons=[[torch.tensor([32])] * 4, good[1]]), ValueError,
         r"expert_neurons\[moe layer 0 = decoder layer 0\]\[expert 0\]: index 32 out of range \[0, 32\)"),
        (dict(expert_neurons=[[torch.tensor([1.0])] * 4, good[1]]), TypeError, "integer dtype"),
        (dict(neurons=[torch.tensor([1])], expert_neurons=good), ValueError, "neurons cover 1 layers, the model has 0 MLPs"),
    ]
    for kw, error, match in cases:
        with pytest.raises(error, match=match):
            with lk.deactivate(model, **kw):
                pass
        assert not patching.is_patched(model)
    with pytest.raises(ValueError, match="the model has no mixture-of-experts layers"):
        with lk.deactivate(tiny_model("llama", num_layers=2), [torch.tensor([1])] * 2, expert_neurons=good):
            pass
    ns = lk.NeuronSet({"a": []}, 0, 0, experts={"a": good}, expert_layout=(shape.layers, 4, 32),
                      model_fingerprint=lk.model_fingerprint(model))
    with pytest.raises(ValueError, match="not both"):
        with lk.deactivate(model, (ns, "a"), expert_neurons=good):
            pass
    with pytest.raises(lk.ModelMismatchError):
        with lk.deactivate(tiny_model("mixtral", seed=3, num_layers=2), (ns, "a")):
            pass
