"""Nothing stale: "already complete" and resume decisions compare the inputs' content (the text
read, the model's fingerprint, the neuron set), not their paths. Before: editing a language's
text and rerunning the same collect/finetune said "already complete" and kept the old result
(the settings hash covered path strings; run.json's train_digest was never compared)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safety_world import leftovers, one_line_error


def _edit(corpus: Path, lang: str = "aa") -> None:
    """Same size and alphabet, other text: only the content tells it apart."""
    path = corpus / f"{lang}.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(reversed(lines)) + "\n")


# ----------------------------------------------------------------------------- collect
def test_collect_recomputes_when_the_text_changed(world, tmp_path):
    from lape_kernels.stats import StatsByLanguage

    corpus = world.corpus_copy(tmp_path / "corpus")
    out = tmp_path / "stats"
    world.ok(*world.collect_args(world.model_a, corpus, out))
    old = StatsByLanguage.load(out)
    assert "already complete" in world.ok(*world.collect_args(world.model_a, corpus, out))
    _edit(corpus)
    err = world.ok(*world.collect_args(world.model_a, corpus, out))
    assert "already complete" not in err and "changed" in err
    fresh = tmp_path / "fresh"
    world.ok(*world.collect_args(world.model_a, corpus, fresh))
    new, want = StatsByLanguage.load(out), StatsByLanguage.load(fresh)
    assert new["aa"].equal(want["aa"]) and not new["aa"].equal(old["aa"])
    assert new["bb"].equal(old["bb"])
    inputs = json.loads((out / "index.json").read_text())["collect"]["inputs"]
    assert set(inputs["text"]) == {"aa", "bb"} and inputs["model_fingerprint"].startswith("v1:")


def test_collect_recomputes_when_the_model_changed_at_the_same_path(world, tmp_path):
    from lape_kernels.stats import StatsByLanguage

    model = tmp_path / "model"
    shutil.copytree(world.model_a, model)
    out = tmp_path / "stats"
    world.ok(*world.collect_args(model, world.corpus, out))
    shutil.rmtree(model)
    shutil.copytree(world.model_b, model)  # other weights, same path and shape
    err = world.ok(*world.collect_args(model, world.corpus, out))
    assert "already complete" not in err and "model" in err
    on_b = tmp_path / "on_b"
    world.ok(*world.collect_args(world.model_b, world.corpus, on_b))
    assert StatsByLanguage.load(out)["aa"].equal(StatsByLanguage.load(on_b)["aa"])


def test_half_done_collect_of_changed_text_stops(world, tmp_path, monkeypatch):
    corpus = world.corpus_copy(tmp_path / "corpus")
    out = tmp_path / "stats"
    args = world.collect_args(world.model_a, corpus, out)
    world.interrupted_collect(args, monkeypatch)
    partial = tmp_path / ".stats.partial"
    assert partial.is_dir()
    _edit(corpus)
    rc, _, err = world.main(*args)
    assert rc == 1
    one_line_error(err, str(partial), "changed", "--overwrite")
    assert partial.is_dir() and not out.exists()
    world.ok(*args, "--overwrite")
    assert out.is_dir() and leftovers(out) == []


# ----------------------------------------------------------------------------- finetune
def test_finetune_recomputes_when_the_text_changed(world, tmp_path):
    corpus = world.corpus_copy(tmp_path / "corpus")
    out = tmp_path / "run"
    world.ok(*world.finetune_args(world.model_a, corpus, out))
    old = json.loads((out / "run.json").read_text())
    assert "already complete" in world.ok(*world.finetune_args(world.model_a, corpus, out))
    _edit(corpus)
    err = world.ok(*world.finetune_args(world.model_a, corpus, out))
    assert "already complete" not in err and "changed" in err
    new = json.loads((out / "run.json").read_text())
    fresh = tmp_path / "fresh"
    world.ok(*world.finetune_args(world.model_a, corpus, fresh))
    want = json.loads((fresh / "run.json").read_text())
    assert new["inputs"] == want["inputs"] != old["inputs"]
    assert new["final"] == want["final"] != old["final"]


def test_run_json_records_the_digests_of_what_it_read(world):
    import lape_kernels as lk
    from lape_kernels.neurons import NeuronSet

    run = json.loads((world.run_a / "run.json").read_text())
    inputs = run["inputs"]
    from transformers import AutoModelForCausalLM

    model_a = AutoModelForCausalLM.from_pretrained(world.model_a)
    assert inputs["model_fingerprint"] == lk.model_fingerprint(model_a) == run["model_fingerprint"]
    assert set(inputs["text"]) == {"train", "validation"} and all(len(v) == 32 for v in inputs["text"].values())
    assert inputs["neurons"] == run["neuron_set_digest"]
    assert NeuronSet.load(world.run_a / "neurons").model_fingerprint == inputs["model_fingerprint"]


def test_half_done_finetune_of_changed_text_stops(world, tmp_path):
    corpus = world.corpus_copy(tmp_path / "corpus")
    out = tmp_path / "run"
    args = world.finetune_args(world.model_a, corpus, out, steps=4)
    rc, _, _ = world.main(*args, "--stop-after-steps", "1")
    assert rc == 3
    _edit(corpus)
    rc, _, err = world.main(*args)
    assert rc == 1
    one_line_error(err, str(tmp_path / ".run.partial"), "changed", "--overwrite")
    world.ok(*args, "--overwrite")
    assert json.loads((out / "run.json").read_text())["steps"] == 4 and leftovers(out) == []


def test_finetune_with_other_neurons_at_the_same_path_is_not_reused(world, tmp_path):
    """The neuron set is an input by content (the indices selected), not by path: a regenerated
    set at the same path is another run (refused without --overwrite), never "already complete"."""
    from lape_kernels.neurons import NeuronSet

    neurons = tmp_path / "neurons"
    shutil.copytree(world.neurons_a, neurons)
    out = tmp_path / "run"
    world.ok(*world.finetune_args(world.model_a, world.corpus, out, neurons=neurons))
    ns = NeuronSet.load(neurons)
    fewer = NeuronSet({lang: [t[: max(1, len(t) // 2)] for t in ns[lang]] for lang in ns.languages},
                      ns.num_layers, ns.intermediate_size, model_id=ns.model_id,
                      model_fingerprint=ns.model_fingerprint)
    shutil.rmtree(neurons)
    fewer.save(neurons)
    rc, _, err = world.main(*world.finetune_args(world.model_a, world.corpus, out, neurons=neurons))
    assert rc == 1
    one_line_error(err, str(out), "exists", "--overwrite")
    world.ok(*world.finetune_args(world.model_a, world.corpus, out, "--overwrite", neurons=neurons))
    assert json.loads((out / "run.json").read_text())["neuron_count"] == fewer.total("aa")
