"""The command line, the demo report and the ablation example on mixture-of-experts models: a tiny
Qwen3-MoE / Mixtral saved as a local model directory (``make_toy_setup(family=...)``) with the
toy corpus. The CLI's outputs are checked against the library run on the same inputs."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import lape_kernels as lk
from lape_kernels.cli import main
from lape_kernels.experiment.collect import load_stats
from lape_kernels.experiment.toy import make_toy_setup

REPO = Path(__file__).resolve().parents[2]
LANGS = ["aa", "bb", "cc", "en"]


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe_run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"toy-{request.param}")
    model, corpus = make_toy_setup(str(root), family=request.param, lines=80)
    stats, neurons = root / "stats", root / "neurons"
    assert main(["collect", "--model", str(model), "--data", str(corpus), "--languages", *LANGS,
                 "--tokens", "1024", "--seq-len", "64", "--batch-size", "8", "-o", str(stats)]) == 0
    return {"root": root, "model": model, "corpus": corpus, "stats": stats, "neurons": neurons,
            "family": request.param}


def test_collect_writes_expert_statistics(moe_run):
    from transformers import AutoModelForCausalLM

    stats = load_stats([str(moe_run["stats"])])
    model = AutoModelForCausalLM.from_pretrained(str(moe_run["model"]))
    shape = lk.introspection.expert_shape(model)
    for lang in LANGS:
        ex = stats[lang].experts
        assert ex is not None and ex.layers == shape.layers
        assert ex.shape == (len(shape.layers), shape.num_experts, shape.intermediate_size)
        assert int(ex.routed.sum()) == 2 * len(shape.layers) * stats[lang].n_tokens  # top-2, no padding
        assert stats[lang].meta["model_fingerprint"] == lk.model_fingerprint(model)


def test_identify_cli_equals_the_library(moe_run, capsys):
    out = moe_run["neurons"]
    assert main(["identify", str(moe_run["stats"]), "--top-rate", "0.1", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    ns = lk.NeuronSet.load(out)
    want = lk.identify(load_stats([str(moe_run["stats"])]), top_rate=0.1)
    assert ns == want and ns.has_experts and ns.thresholds == want.thresholds
    assert sum(ns.total(lang) for lang in LANGS) > 0
    for m, layer in enumerate(ns.expert_layers):  # the table's expert rows: per MoE layer, summed over experts
        row = next(ln for ln in printed.splitlines() if ln.startswith(f"| {layer} experts |"))
        assert row == f"| {layer} experts | " + " | ".join(str(int(ns.expert_counts(l)[m].sum())) for l in LANGS) + " |"
    assert f"| total | {' | '.join(str(ns.total(l)) for l in LANGS)} |" in printed


def test_identify_reference_format_is_refused_for_moe(moe_run, capsys):
    out = moe_run["root"] / "ref.pt"
    rc = main(["identify", str(moe_run["stats"]), "--format", "reference", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1
    assert "reference format" in err and "no expert neurons" in err and "--format lape" in err
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".ref")]


def test_ablation_example_on_moe(moe_run, tmp_path):
    """examples/ablation.py deactivates each language's dense and expert neurons (and a random
    set of the same size over all units) and writes the per-expert heat map."""
    if moe_run["family"] != "qwen3_moe":
        pytest.skip("one family is enough for the example")
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import ablation
    finally:
        sys.path.pop(0)
    out = tmp_path / "abl"
    res = ablation.run_ablation(str(moe_run["model"]), LANGS[:3], str(out), data=str(moe_run["corpus"]),
                                tokens=1024, seq_len=64, val_tokens=256, batch_size=4, top_rate=0.1,
                                filter_rate=0.95, activation_bar_ratio=0.95, collect_dtype="float32", quiet=True)
    assert res["settings"]["plots"] == ["neurons_per_expert.png"]
    assert (out / "neurons_per_expert.png").stat().st_size > 1000
    assert "![neurons per expert](neurons_per_expert.png)" in (out / "ablation.md").read_text()
    rows = [k for k in LANGS[:3] if k in res["lape_ppl"]]
    assert rows and all(res["lape_ppl"][k][k] != res["base_ppl"][k] for k in rows)  # deactivation took effect
    assert all(res["random_ppl"][k][k] != res["base_ppl"][k] for k in rows)


def test_expert_heatmap_and_table(tmp_path):
    from PIL import Image

    from lape_kernels.neurons import per_layer_table, plot_expert_heatmap, plot_heatmap

    ex = {"a": [[torch.tensor([1, 2]), torch.tensor([0])], [torch.tensor([], dtype=torch.int64), torch.tensor([3])]],
          "b": [[torch.tensor([0]), torch.tensor([], dtype=torch.int64)], [torch.tensor([1]), torch.tensor([1, 2, 3])]]}
    ns = lk.NeuronSet({"a": [torch.tensor([5])] * 4, "b": [torch.tensor([], dtype=torch.int64)] * 4}, 4, 8,
                      experts=ex, expert_layout=((1, 3), 2, 4))
    assert per_layer_table(ns).splitlines()[2:] == [
        "| 0 mlp | 1 | 0 |", "| 1 mlp | 1 | 0 |", "| 2 mlp | 1 | 0 |", "| 3 mlp | 1 | 0 |",
        "| 1 experts | 3 | 1 |", "| 3 experts | 1 | 4 |", "| total | 8 | 5 |"]
    path = plot_expert_heatmap(ns, tmp_path / "h.png", languages="b")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100
    plot_heatmap(ns, tmp_path / "d.png")  # the dense (shared-expert) part
    with pytest.raises(KeyError, match="language 'zz' not in this NeuronSet"):
        plot_expert_heatmap(ns, tmp_path / "x.png", languages=["zz"])
    dense = lk.NeuronSet({"a": [torch.tensor([1])]}, 1, 4)
    with pytest.raises(ValueError, match="no expert neurons .* use plot_heatmap"):
        plot_expert_heatmap(dense, tmp_path / "y.png")
    no_dense = lk.NeuronSet({"a": []}, 0, 0, experts={"a": ex["a"]}, expert_layout=((1, 3), 2, 4))
    with pytest.raises(ValueError, match="no dense MLP layers .* use plot_expert_heatmap"):
        plot_heatmap(no_dense, tmp_path / "z.png")
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "z.png").exists()


def test_moe_heatmap_script(tmp_path):
    """examples/moe_heatmap.py (the README's figure) on a smaller budget: the PNG and the tables of
    the neuron set it identified."""
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import moe_heatmap
    finally:
        sys.path.pop(0)
    png = moe_heatmap.run("mixtral", str(tmp_path / "out"), tokens=512, top_rate=0.05, work=str(tmp_path / "work"))
    assert png.name == "moe_neurons_per_expert.png" and png.stat().st_size > 1000
    ns = lk.NeuronSet.load(tmp_path / "work" / "neurons")
    assert ns.expert_layout == ((0, 1, 2, 3), 8, 128)
    text = (tmp_path / "out" / "moe_neurons_per_expert.md").read_text()
    for lang in ns.languages:
        first = ns.expert_counts(lang)[0].tolist()
        assert f"| 0 | {' | '.join(map(str, first))} |" in text

