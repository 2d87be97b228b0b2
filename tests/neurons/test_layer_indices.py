"""One rule for a layer's neuron indices (``check_layer_indices``): every entry point that takes
indices (NeuronSet, patch, deactivate, load_neurons) refuses the same input with the same
message."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import lape_kernels as lk
from lape_kernels.neurons import NeuronSet
from lape_kernels.neurons.neuron_set import check_layer_indices
from lape_kernels.testing import tiny_model
from lape_kernels.training.io import WEIGHTS_NAME, NeuronFileError

I = 128


@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.integers(-3, 12), max_size=8), size=st.integers(1, 12))
def test_rule(values, size):
    """Accepted exactly when in range and free of duplicates; returned sorted, with whether the
    input was sorted already."""
    ok = all(0 <= v < size for v in values) and len(set(values)) == len(values)
    if ok:
        t, was_sorted = check_layer_indices(values, "x", size)
        assert t.dtype == torch.int64 and t.tolist() == sorted(values)
        assert was_sorted == (values == sorted(values))
    else:
        with pytest.raises(ValueError, match=r"^x: (index -?\d+ out of range \[0, \d+\)|duplicate index \d+)$"):
            check_layer_indices(values, "x", size)


def test_input_is_copied_to_a_cpu_int64_tensor():
    src = torch.tensor([3, 1], dtype=torch.int32)
    t, was_sorted = check_layer_indices(src, "x", 8)
    assert t.tolist() == [1, 3] and t.dtype == torch.int64 and not was_sorted
    t.zero_()
    assert src.tolist() == [3, 1]
    assert check_layer_indices([], "x", 8)[0].numel() == 0
    assert check_layer_indices([5], "x")[0].tolist() == [5]  # no upper bound when the size is unknown
    with pytest.raises(ValueError, match=r"index -1 out of range \[0, inf\)"):
        check_layer_indices([-1], "x")


@pytest.mark.parametrize("values, int64_tensor, exc, match", [
    ([1, 2], True, TypeError, "x: expected a torch.Tensor of int64 indices, got list"),
    (torch.tensor([1], dtype=torch.int32), True, TypeError, r"x: indices must be int64 \(torch.long\), got torch.int32"),
    (torch.tensor([1.0]), False, TypeError, "x: indices must have an integer dtype"),
    (torch.tensor([True]), False, TypeError, "x: indices must have an integer dtype"),
    ([1, 2.0], False, TypeError, "x: indices must be integers"),
    ("12", False, TypeError, "x: expected a 1-D integer tensor"),
    (torch.zeros(2, 2, dtype=torch.int64), True, ValueError, r"x: indices must be 1-D, got shape \(2, 2\)"),
])
def test_type_errors(values, int64_tensor, exc, match):
    with pytest.raises(exc, match=match):
        check_layer_indices(values, "x", 8, int64_tensor=int64_tensor)


def _neuron_set(bad):
    NeuronSet({"x": [bad, [0]]}, 2, I)


def _patch(bad):
    lk.patch(tiny_model("llama", num_layers=2), neurons=[bad, torch.tensor([0])])


def _deactivate(bad):
    with lk.deactivate(tiny_model("llama", num_layers=2), [bad, torch.tensor([0])]):
        pass


@pytest.fixture(scope="module")
def saved_neurons(tmp_path_factory):
    model = lk.patch(tiny_model("llama", num_layers=2), neurons=[torch.tensor([1, 2, 3]), torch.tensor([0])])
    return lk.save_neurons(model, tmp_path_factory.mktemp("saved") / "neurons")


def _load(saved, bad, tmp_path):
    tensors = load_file(str(saved / WEIGHTS_NAME))
    tensors["layers.0.index"] = bad
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "lape_config.json").write_text((saved / "lape_config.json").read_text())
    save_file(tensors, str(tmp_path / "n" / WEIGHTS_NAME))
    lk.load_neurons(tiny_model("llama", num_layers=2), tmp_path / "n")


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([2, 1, 2]), "duplicate index 2"),
    (torch.tensor([1, 2, I]), rf"index {I} out of range \[0, {I}\)"),
    (torch.tensor([-1, 1, 2]), rf"index -1 out of range \[0, {I}\)"),
])
@pytest.mark.parametrize("entry", ["NeuronSet", "patch", "deactivate", "load_neurons"])
def test_every_entry_point_gives_the_same_message(entry, bad, message, saved_neurons, tmp_path):
    if entry == "load_neurons":
        with pytest.raises(NeuronFileError, match=r"layers\.0\.index must be sorted unique indices .*: " + message):
            _load(saved_neurons, bad, tmp_path)
        return
    call = {"NeuronSet": _neuron_set, "patch": _patch, "deactivate": _deactivate}[entry]
    where = r"neurons\['x'\]\[layer 0\]" if entry == "NeuronSet" else r"neurons\[layer 0\]"
    with pytest.raises(ValueError, match=f"^{where}: {message}$"):
        call(bad)


def test_what_differs_between_entry_points_is_documented_strictness():
    """NeuronSet reads files and lists (any integer dtype, sorted for you); patch takes what it
    documents (int64 tensors); a saved neuron file must already be sorted."""
    assert NeuronSet({"x": [[3, 1]]}, 1, 8)["x"][0].tolist() == [1, 3]
    with pytest.raises(TypeError, match="int64"):
        _patch(torch.tensor([1], dtype=torch.int32))
    model = lk.patch(tiny_model("llama", num_layers=2), neurons=[torch.tensor([3, 1]), torch.tensor([0])])
    assert model.model.layers[0].mlp.lape_neuron_index.tolist() == [1, 3]
