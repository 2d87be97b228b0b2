"""Nothing foreign: statistics, neuron sets and saved neurons carry the fingerprint of their model;
applying them to (or mixing them with) another model is an error naming both, unless the
transfer is explicit. Files without a fingerprint (reference format, older files) still load."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import LANGS, named_model, recorded

import lape_kernels as lk
from lape_kernels.neurons import NeuronSet
from lape_kernels.stats import ActivationStats, StatsByLanguage
from lape_kernels.testing import random_neurons, tiny_model


def _names_both(message: str, a, b) -> None:
    assert lk.model_fingerprint(a) in message and lk.model_fingerprint(b) in message, message
    assert a.config._name_or_path in message and b.config._name_or_path in message, message
    assert "\n" not in message


# ----------------------------------------------------------------------------- statistics
def test_record_writes_the_fingerprint_and_save_load_keeps_it(base, tmp_path):
    stats = recorded(base)
    fp = lk.model_fingerprint(base)
    assert all(s.meta["model_fingerprint"] == fp and s.model_fingerprint == fp and not s.notes for s in stats.values())
    assert stats.model_fingerprint == fp
    stats.save(tmp_path / "stats")
    loaded = StatsByLanguage.load(tmp_path / "stats")
    assert loaded.model_fingerprint == fp and loaded["cy"].source == str(tmp_path / "stats" / "cy.safetensors")
    loaded.validate(base)


def test_stats_validated_against_another_model_name_both(base, instruct, tmp_path):
    recorded(base).save(tmp_path / "stats")
    stats = StatsByLanguage.load(tmp_path / "stats")
    with pytest.raises(lk.ModelMismatchError, match="allow_other_model=True") as info:
        stats.validate(instruct)
    _names_both(str(info.value), base, instruct)
    assert str(tmp_path / "stats" / "en.safetensors") in str(info.value)
    assert stats.validate(instruct, allow_other_model=True) is stats
    with pytest.raises(ValueError, match=r"shape .* \[3, 128\].*\[2, 128\]"):
        stats["en"].validate(tiny_model("llama", num_layers=2))


def test_bf16_copy_accepts_stats_of_the_fp32_model(base):
    stats = recorded(base)
    copy = named_model("elsewhere/bf16-copy", dtype=torch.bfloat16)
    stats.validate(copy)
    lk.identify(stats, top_rate=0.05).validate(copy)


def test_adding_shards_of_two_models_is_an_error(base, instruct):
    a, b = recorded(base)["en"], recorded(instruct)["en"]
    with pytest.raises(lk.ModelMismatchError, match="cannot add statistics of different models") as info:
        a + b
    _names_both(str(info.value), base, instruct)
    total = a + recorded(base, seed=1)["en"]
    assert total.model_fingerprint == lk.model_fingerprint(base)
    # a shard without a fingerprint (an older file) is accepted, the known one is kept
    old = ActivationStats(a.over_zero, a.act_sum, a.n_tokens, {k: v for k, v in a.meta.items() if k != "model_fingerprint"})
    assert (old + a).model_fingerprint == a.model_fingerprint


def test_grouping_languages_of_two_models_is_an_error(base, instruct):
    with pytest.raises(lk.ModelMismatchError, match="cannot group statistics of different models"):
        StatsByLanguage(LANGS, {"en": recorded(base)["en"], "cy": recorded(instruct)["cy"]})


# ----------------------------------------------------------------------------- identify
def test_identify_refuses_stats_of_two_models_of_one_shape(base, instruct):
    """Before: the two models' counts were mixed silently and model_id became None."""
    a, b = recorded(base), recorded(instruct)
    with pytest.raises(lk.ModelMismatchError, match="cannot identify neurons from statistics of different models") as info:
        lk.identify({"en": a["en"], "cy": b["cy"]}, top_rate=0.05)
    _names_both(str(info.value), base, instruct)
    assert "'en'" in str(info.value) and "'cy'" in str(info.value)


def test_identify_carries_the_fingerprint_also_from_moved_files(base, tmp_path):
    recorded(base).save(tmp_path / "a")
    stats_a = StatsByLanguage.load(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    # as if collected from two directories holding one model
    stats_b = StatsByLanguage.load(tmp_path / "b")
    stats_b["cy"].meta["model"] = "/moved/base-model"
    ns = lk.identify({"en": stats_a["en"], "cy": stats_b["cy"]}, top_rate=0.05)
    assert ns.model_fingerprint == lk.model_fingerprint(base)
    assert ns.model_id == "org/base-model"  # before: None as soon as two names differed
    assert any("2 model paths" in n and "one model by its fingerprint" in n for n in ns.notes)


def test_identify_of_reference_dicts_notes_the_unknown_model():
    stats = {"a": {"n": 10, "over_zero": torch.tensor([[1, 9, 5]])}, "b": {"n": 10, "over_zero": torch.tensor([[9, 1, 5]])}}
    ns = lk.identify(stats, top_rate=0.5)
    assert ns.model_fingerprint is None
    assert any("no model fingerprint recorded for language 'a', language 'b'" in n for n in ns.notes)


# ----------------------------------------------------------------------------- neuron sets
def test_neuron_set_save_load_keeps_the_fingerprint(base, tmp_path):
    ns = lk.identify(recorded(base), top_rate=0.05)
    ns.save(tmp_path / "ns")
    loaded = NeuronSet.load(tmp_path / "ns")
    assert loaded.model_fingerprint == ns.model_fingerprint == lk.model_fingerprint(base)
    assert loaded.source == str(tmp_path / "ns") and not loaded.notes
    assert loaded.validate(base) is loaded


def test_neuron_set_on_another_model_names_both_and_the_file(base, instruct, tmp_path):
    lk.identify(recorded(base), top_rate=0.05).save(tmp_path / "ns")
    ns = NeuronSet.load(tmp_path / "ns")
    with pytest.raises(lk.ModelMismatchError) as info:
        ns.validate(instruct)
    _names_both(str(info.value), base, instruct)
    assert str(tmp_path / "ns") in str(info.value)
    assert ns.validate(instruct, allow_other_model=True) is ns
    assert ns.validate(instruct.config) is ns  # a config has no weights: the shape only


def test_patch_with_another_models_neuron_set_is_refused_and_changes_nothing(base, instruct):
    ns = lk.identify(recorded(base), top_rate=0.05)
    before = {k: v.clone() for k, v in instruct.state_dict().items()}
    with pytest.raises(lk.ModelMismatchError, match=r"transfer_to\(model\)") as info:
        lk.patch(instruct, neurons=ns, language="cy")
    _names_both(str(info.value), base, instruct)
    assert not lk.is_patched(instruct)
    assert all(torch.equal(before[k], v) for k, v in instruct.state_dict().items())
    # the deliberate transfer
    moved = ns.transfer_to(instruct)
    assert moved == ns and moved.model_fingerprint == lk.model_fingerprint(instruct)
    assert moved.model_id == "org/instruct-model" and "transferred by transfer_to" in moved.notes[-1]
    lk.patch(instruct, neurons=moved, language="cy")
    assert sum(p.numel() for p in lk.trainable_parameters(instruct)) == 3 * 64 * ns.total("cy")


def test_deactivate_with_another_models_neuron_set_is_refused(base, instruct):
    ns = lk.identify(recorded(base), top_rate=0.05)
    with pytest.raises(lk.ModelMismatchError):
        with lk.deactivate(instruct, (ns, "cy")):
            pass
    assert not lk.is_patched(instruct)
    with lk.deactivate(instruct, (ns.transfer_to(instruct), "cy")):
        pass


def test_reference_format_carries_none_and_is_accepted(base, instruct, tmp_path):
    ns = lk.identify(recorded(base), top_rate=0.05)
    ns.save(tmp_path / "ref.pt", format="reference")
    loaded = NeuronSet.load(tmp_path / "ref.pt", languages=LANGS, intermediate_size=128)
    assert loaded.model_fingerprint is None
    assert any("reference format carries none" in n and "model checks accept it" in n for n in loaded.notes)
    loaded.validate(instruct)
    lk.patch(instruct, neurons=loaded, language="cy")


def test_neuron_set_written_before_fingerprints_loads_with_a_note(base, instruct, tmp_path):
    lk.identify(recorded(base), top_rate=0.05).save(tmp_path / "old")
    meta_path = tmp_path / "old" / "neurons.json"
    meta = json.loads(meta_path.read_text())
    del meta["model_fingerprint"]
    meta_path.write_text(json.dumps(meta))
    ns = NeuronSet.load(tmp_path / "old")
    assert ns.model_fingerprint is None and any("no model fingerprint recorded" in n for n in ns.notes)
    ns.validate(instruct)
    ns.save(tmp_path / "again")
    assert NeuronSet.load(tmp_path / "again").notes == ns.notes  # the note is not repeated


def test_stats_written_before_fingerprints_load_with_a_note(base, instruct, tmp_path):
    stats = recorded(base)["en"]
    old = ActivationStats(stats.over_zero, stats.act_sum, stats.n_tokens,
                          {k: v for k, v in stats.meta.items() if k != "model_fingerprint"})
    old.save(tmp_path / "old.safetensors")
    loaded = ActivationStats.load(tmp_path / "old.safetensors")
    assert loaded.model_fingerprint is None
    assert loaded.notes and str(tmp_path / "old.safetensors") in loaded.notes[0]
    assert loaded.validate(instruct) is loaded
    ns = lk.identify({"en": loaded, "cy": recorded(base)["cy"]}, top_rate=0.05)
    assert ns.model_fingerprint == lk.model_fingerprint(base) and any("'en'" in n for n in ns.notes)


# ----------------------------------------------------------------------------- saved neurons
def _trained(model, tmp_path):
    lk.patch(model, neurons=random_neurons(3, 128, 3))
    with torch.no_grad():
        for p in lk.trainable_parameters(model):
            p.add_(0.5)
    return lk.save_neurons(model, tmp_path / "saved")


def test_saved_neurons_carry_the_base_fingerprint(base, tmp_path):
    fp = lk.model_fingerprint(base)
    path = _trained(base, tmp_path)
    assert json.loads((path / "lape_config.json").read_text())["model_fingerprint"] == fp
    fresh = named_model("/some/other/dir")  # the same weights, loaded from elsewhere
    lk.load_neurons(fresh, path)
    assert fresh._lape_sparse["notes"] == []


def test_load_neurons_onto_another_base_model_names_both(base, instruct, tmp_path):
    path = _trained(base, tmp_path)
    with pytest.raises(lk.ModelMismatchError, match=r"load_neurons\(\.\.\., allow_other_model=True\)") as info:
        lk.load_neurons(instruct, path)
    _names_both(str(info.value), base, instruct)
    assert str(path) in str(info.value)
    assert not lk.is_patched(instruct)
    lk.load_neurons(instruct, path, allow_other_model=True)
    assert "on purpose (allow_other_model=True)" in instruct._lape_sparse["notes"][0]


def test_saved_neurons_written_before_fingerprints_load_with_a_note(base, instruct, tmp_path):
    path = _trained(base, tmp_path)
    cfg = json.loads((path / "lape_config.json").read_text())
    del cfg["model_fingerprint"]
    (path / "lape_config.json").write_text(json.dumps(cfg))
    lk.load_neurons(instruct, path)
    assert "no model fingerprint recorded" in instruct._lape_sparse["notes"][0]


def test_saved_neurons_of_an_unreadable_model_say_so(base, instruct, tmp_path, monkeypatch):
    import lape_kernels.training.io as io

    monkeypatch.setattr(io, "model_fingerprint", lambda model: None)  # as for a sharded (FSDP2) model
    path = _trained(base, tmp_path)
    monkeypatch.undo()
    lk.load_neurons(instruct, path)
    assert "could not be read when saving" in instruct._lape_sparse["notes"][0]
