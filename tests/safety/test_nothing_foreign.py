"""Nothing foreign at the CLI: a run, a neuron set or statistics made on model A are refused on
model B (same shape, other weights) naming both, unless `--allow-other-model` says the transfer
is deliberate; reference-format neuron files carry no fingerprint and are accepted."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safety_world import leftovers, one_line_error


def _fingerprint(model_dir: Path) -> str:
    import lape_kernels as lk
    from transformers import AutoModelForCausalLM

    return lk.model_fingerprint(AutoModelForCausalLM.from_pretrained(model_dir))


def test_eval_refuses_a_run_of_another_model(world, tmp_path):
    """Before: A's trained rows were applied to B because the shapes matched."""
    out = tmp_path / "e.json"
    rc, _, err = world.main(*world.eval_args(world.model_b, out, run=world.run_a))
    assert rc == 1
    one_line_error(err, str(world.run_a), _fingerprint(world.model_a), _fingerprint(world.model_b),
                   "--allow-other-model")
    assert not out.exists() and leftovers(out) == []
    world.ok(*world.eval_args(world.model_b, out, "--allow-other-model", run=world.run_a))
    assert "after" in json.loads(out.read_text())


def test_finetune_refuses_neurons_of_another_model(world, tmp_path):
    """Before: `finetune --model B --neurons <identified on A>` trained silently."""
    out = tmp_path / "run"
    rc, _, err = world.main(*world.finetune_args(world.model_b, world.corpus, out))
    assert rc == 1
    one_line_error(err, str(world.neurons_a), _fingerprint(world.model_a), _fingerprint(world.model_b),
                   "--allow-other-model")
    assert not out.exists() and leftovers(out) == []
    world.ok(*world.finetune_args(world.model_b, world.corpus, out, "--allow-other-model"))
    from lape_kernels.neurons import NeuronSet

    run = json.loads((out / "run.json").read_text())
    trained = NeuronSet.load(out / "neurons")
    assert run["model_fingerprint"] == trained.model_fingerprint == _fingerprint(world.model_b)
    assert any("transferred" in note or "allow" in note for note in trained.notes), trained.notes


def test_reference_format_neurons_carry_no_fingerprint_and_are_accepted(world, tmp_path):
    ref = tmp_path / "ref.pt"
    world.ok("identify", str(world.stats_a), "--top-rate", "0.1", "--format", "reference", "-o", str(ref))
    out = tmp_path / "run"
    world.ok(*world.finetune_args(world.model_b, world.corpus, out, "--neuron-languages", *world.LANGS,
                                  neurons=ref))
    assert json.loads((out / "run.json").read_text())["model_fingerprint"] == _fingerprint(world.model_b)


def test_identify_refuses_statistics_of_two_models(world, tmp_path):
    """Before: counts of two models of one shape were mixed and model_id became null."""
    stats_b = tmp_path / "stats_b"
    world.ok(*world.collect_args(world.model_b, world.corpus, stats_b, languages=["cc"]))
    out = tmp_path / "neurons"
    rc, _, err = world.main("identify", str(world.stats_a), str(stats_b), "--top-rate", "0.1", "-o", str(out))
    assert rc == 1
    one_line_error(err, "different models", _fingerprint(world.model_a), _fingerprint(world.model_b))
    assert not out.exists() and leftovers(out) == []


def test_outputs_carry_the_model_fingerprint(world):
    from lape_kernels.neurons import NeuronSet
    from lape_kernels.stats import StatsByLanguage

    fp = _fingerprint(world.model_a)
    assert StatsByLanguage.load(world.stats_a).model_fingerprint == fp
    ns = NeuronSet.load(world.neurons_a)
    assert ns.model_fingerprint == fp and ns.model_id is not None
    assert json.loads((world.run_a / "run.json").read_text())["model_fingerprint"] == fp
    assert NeuronSet.load(world.run_a / "neurons").model_fingerprint == fp
