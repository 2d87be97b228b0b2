"""finetune and eval on a mixture-of-experts model (a tiny Qwen3-MoE saved as a local directory,
the toy corpus): --method neurons/random train the set's expert neurons, eval merges them."""
from __future__ import annotations

import json

import pytest
import torch

import lape_kernels as lk
from lape_kernels.cli import main
from lape_kernels.experiment.toy import make_toy_setup

LANGS = ["aa", "bb", "cc", "en"]


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-ft")
    model, corpus = make_toy_setup(str(root), family="qwen3_moe", lines=80)
    stats = root / "stats"
    assert main(["collect", "--model", str(model), "--data", str(corpus), "--languages", *LANGS,
                 "--tokens", "1024", "--seq-len", "64", "--batch-size", "8", "-o", str(stats)]) == 0
    return {"root": root, "model": model, "corpus": corpus, "stats": stats}


def test_finetune_and_eval_train_expert_neurons(moe_run, tmp_path):
    """finetune --method neurons/random on a MoE model trains the set's expert neurons (random: the
    same total over all units); the run's trained set and saved neurons carry them; eval merges
    the run and measures it."""
    neurons = moe_run["root"] / "neurons"
    assert main(["identify", str(moe_run["stats"]), "--top-rate", "0.1", "-o", str(neurons)]) == 0
    ns = lk.NeuronSet.load(neurons)
    hidden = 64
    runs = {}
    for method in ("neurons", "random"):
        out = tmp_path / method
        assert main(["finetune", "--model", str(moe_run["model"]), "--data", str(moe_run["corpus"]), "--language", "aa",
                     "--method", method, "--neurons", str(neurons), "--steps", "2", "--batch-size", "2",
                     "--eval-every", "2", "--val-tokens", "128", "--seq-len", "64", "-o", str(out)]) == 0
        run = json.loads((out / "run.json").read_text())
        trained = lk.NeuronSet.load(out / "neurons")
        assert trained.has_experts and trained.expert_layout == ns.expert_layout
        assert trained.total("aa") == ns.total("aa") and run["trainable_params"] == 3 * hidden * ns.total("aa")
        runs[method] = (run, trained)
    assert [[t.tolist() for t in row] for row in runs["neurons"][1].select_experts("aa")] == \
        [[t.tolist() for t in row] for row in ns.select_experts("aa")]
    assert not torch.equal(runs["random"][1].expert_counts("aa"), torch.zeros_like(ns.expert_counts("aa")))
    assert runs["neurons"][0]["settings"]["neuron_set_digest"] != runs["random"][0]["settings"]["neuron_set_digest"]
    ev = tmp_path / "eval.json"
    assert main(["eval", "--model", str(moe_run["model"]), "--data", str(moe_run["corpus"]), "--run",
                 str(tmp_path / "neurons"), "--languages", "aa", "bb", "--target", "aa", "--val-tokens", "128",
                 "--seq-len", "64", "-o", str(ev)]) == 0
    result = json.loads(ev.read_text())
    assert result["after"]["ppl"]["aa"] != result["before"]["ppl"]["aa"]  # the merged expert neurons changed the model


@pytest.mark.slow
def test_demo_on_a_moe_model(tmp_path):
    """`lape-kernels demo` end to end on a tiny Qwen3-MoE (about 2 minutes on 2 cores): the
    report's neuron table has expert rows, the per-expert heat map is written (no dense one), and
    the claims are computed."""
    from PIL import Image

    model, corpus = make_toy_setup(str(tmp_path), family="qwen3_moe")
    out = tmp_path / "report"
    assert main(["demo", "--model", str(model), "--data", str(corpus), "--languages", *LANGS, "--target", "aa",
                 "--config", str(tmp_path / "demo.json"), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| 0 experts |" in text and "](neurons_per_expert.png)" in text and "neurons_per_layer.png" not in text
    with Image.open(out / "neurons_per_expert.png") as im:
        assert im.format == "PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["claims"] and all(c["holds"] in (True, False) for c in summary["claims"])
