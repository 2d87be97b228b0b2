"""The experiment: the demo end to end on a tiny model and toy corpus (report files present and
well-formed, claims computed from the figures), the data order, the claims logic, and (slow)
the real-model deactivation check of examples/ablation.py."""
from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lape_kernels.cli import main
from lape_kernels.experiment.finetune import batch_indices
from lape_kernels.experiment.report import PLOTS, claims
from lape_kernels.experiment.toy import make_toy_setup

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- demo end to end
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    model, corpus = make_toy_setup(str(root))
    out = root / "report"
    args = ["demo", "--model", str(model), "--data", str(corpus), "--languages", "aa", "bb", "cc", "en",
            "--target", "aa", "--config", str(root / "demo.json"), "--out", str(out)]
    assert main(args) == 0
    return {"root": root, "out": out, "args": args}


def test_demo_writes_report_and_plots(demo):
    from PIL import Image

    out = demo["out"]
    text = (out / "report.md").read_text()
    for heading in ("## Setup", "## Claims", "## Target language (aa) validation perplexity",
                    "## Other languages: perplexity change", "## Cost", "## Cross-lingual alignment",
                    "## Where the weights changed", "## Language neurons per layer", "## Plots"):
        assert heading in text, heading
    for method in ("neurons", "random", "full"):
        assert re.search(rf"^\| {method} \| [\d,]+ \| [\d.]+% \| [\d.]+ \| [\d.]+ \| [+-][\d.]+% \|$", text, re.M), method
    assert "| method | bb | cc | en | mean | mean abs |" in text
    for name in PLOTS.values():
        assert f"]({name})" in text
        with Image.open(out / name) as im:
            im.load()
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 150
    # nothing temporary left behind
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_demo_claims_are_computed_from_the_figures(demo):
    out = demo["out"]
    summary = json.loads((out / "summary.json").read_text())
    ev = {m: json.loads((out / "eval" / f"{m}.json").read_text()) for m in ("neurons", "random", "full")}
    c1, c2 = summary["claims"]
    assert c1["holds"] == (ev["neurons"]["target_ppl_change"] < ev["random"]["target_ppl_change"])
    assert c2["holds"] == (ev["neurons"]["other_ppl_abs_change_mean"] < ev["full"]["other_ppl_abs_change_mean"])
    # the other-language mean is the mean of the per-language changes, each after/before - 1
    for m, e in ev.items():
        others = ["bb", "cc", "en"]
        for l in others + ["aa"]:
            assert e["ppl_change"][l] == pytest.approx(e["after"]["ppl"][l] / e["before"]["ppl"][l] - 1)
        assert e["other_ppl_abs_change_mean"] == pytest.approx(sum(abs(e["ppl_change"][l]) for l in others) / 3)
    text = (out / "report.md").read_text()
    for c in (c1, c2):
        assert f"{c['claim']}: **{'true' if c['holds'] else 'false'}**" in text
    # the random control has exactly as many neurons as the LAPE set
    runs = {m: json.loads((out / "runs" / m / "run.json").read_text()) for m in ev}
    assert runs["random"]["neuron_count"] == runs["neurons"]["neuron_count"] > 0
    assert runs["neurons"]["tokens_trained"] == runs["random"]["tokens_trained"] == runs["full"]["tokens_trained"]
    assert runs["neurons"]["trainable_params"] < runs["full"]["trainable_params"]


def test_demo_rerun_reuses_finished_stages(demo, capsys):
    before = {p: p.stat().st_mtime_ns for p in (demo["out"] / "runs").rglob("run.json")}
    capsys.readouterr()
    assert main(demo["args"]) == 0
    captured = capsys.readouterr()
    assert "already complete" in captured.err  # collect
    for method in ("neurons", "random", "full"):
        assert f"{method}: reusing" in captured.out
    after = {p: p.stat().st_mtime_ns for p in (demo["out"] / "runs").rglob("run.json")}
    assert before == after


def test_demo_rerun_on_an_edited_text_recomputes_what_read_it(demo, capsys):
    """Same settings, other content: the runs that read the edited target text are trained again
    and every evaluation is measured again (before: the demo compared settings only and kept the
    old results until --fresh). Edits the fixture's corpus in place: the last test using it."""
    args, out = demo["args"], demo["out"]
    corpus = Path(args[args.index("--data") + 1])
    old_runs = {m: json.loads((out / "runs" / m / "run.json").read_text()) for m in ("neurons", "random", "full")}
    old_eval = json.loads((out / "eval" / "full.json").read_text())
    path = corpus / "aa.txt"  # same size and alphabet, other order: only the content tells it apart
    path.write_text("\n".join(reversed(path.read_text().splitlines())) + "\n")
    capsys.readouterr()
    assert main(args) == 0
    captured = capsys.readouterr()
    # full: same settings, edited text -> recomputed; neurons/random: the statistics (and so the
    # neuron set, part of their settings) changed too -> trained again as runs of new settings
    assert f"full: {out / 'runs' / 'full'} recomputed" in captured.out, captured.out
    assert "reusing" not in captured.out
    for method in ("neurons", "random", "full"):
        new_run = json.loads((out / "runs" / method / "run.json").read_text())
        assert new_run["inputs"] != old_runs[method]["inputs"]
    new_eval = json.loads((out / "eval" / "full.json").read_text())
    assert new_eval["settings"]["validation_text"] != old_eval["settings"]["validation_text"]
    assert new_eval["run"]["inputs"] == json.loads((out / "runs" / "full" / "run.json").read_text())["inputs"]


# ----------------------------------------------------------------------------- pieces
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), b=st.integers(1, 9), seed=st.integers(0, 2 ** 31), start=st.integers(0, 20))
def test_batch_order_is_a_pure_function_of_step(n, b, seed, start):
    """Every epoch visits each sequence once, and a batch does not depend on what came before
    (which is what makes a resumed run see the same data as an uninterrupted one)."""
    cache = {}
    steps = [batch_indices(s, b, n, seed, cache) for s in range(start + 3)]
    fresh = [batch_indices(s, b, n, seed) for s in range(start, start + 3)]
    for a, c in zip(steps[start:], fresh):
        assert torch.equal(a, c)
    flat = torch.cat([batch_indices(s, b, n, seed) for s in range(-(-2 * n // b))])[: 2 * n]
    assert sorted(flat[:n].tolist()) == list(range(n)) and sorted(flat[n:].tolist()) == list(range(n))


def _eval(target_change, other_changes, count=10):
    langs = ["t"] + [f"o{i}" for i in range(len(other_changes))]
    change = {"t": target_change, **{f"o{i}": c for i, c in enumerate(other_changes)}}
    before = {l: 10.0 for l in langs}
    return {"settings": {"target": "t", "languages": langs}, "before": {"ppl": before},
            "after": {"ppl": {l: 10.0 * (1 + change[l]) for l in langs}}, "ppl_change": change,
            "target_ppl_change": target_change,
            "other_ppl_change_mean": sum(other_changes) / len(other_changes),
            "other_ppl_abs_change_mean": sum(abs(c) for c in other_changes) / len(other_changes),
            "run": {"neuron_count": count}}


def test_claims_true_false_and_not_measured():
    good = claims({"neurons": _eval(-0.10, [0.01, -0.01]), "random": _eval(-0.02, [0.0, 0.0]),
                   "full": _eval(-0.2, [0.05, -0.03])})
    assert [c["holds"] for c in good] == [True, True]
    assert "-10.000%" in good[0]["text"] and "-2.000%" in good[0]["text"]
    bad = claims({"neurons": _eval(-0.01, [0.1, 0.1]), "random": _eval(-0.05, [0.0, 0.0]),
                  "full": _eval(-0.2, [0.01, -0.01])})
    assert [c["holds"] for c in bad] == [False, False]
    # a tie is not "more" / "less"
    tie = claims({"neurons": _eval(-0.05, [0.02]), "random": _eval(-0.05, [0.0]), "full": _eval(-0.1, [-0.02])})
    assert [c["holds"] for c in tie] == [False, False]
    missing = claims({"neurons": _eval(-0.1, [0.0])})
    assert [c["holds"] for c in missing] == [None, None]


def test_choose_target_prefers_under_resourced_with_enough_text():
    from datasets import Dataset, DatasetDict

    from lape_kernels.experiment.errors import ExperimentError
    from lape_kernels.experiment.demo import choose_target

    def dd(chars):
        return DatasetDict({"train": Dataset.from_dict({"text": ["x" * chars]}),
                            "validation": Dataset.from_dict({"text": ["y" * (chars // 10)]})})

    corpus = {"en": dd(100000), "cy": dd(300), "eu": dd(90000), "de": dd(100000)}
    assert choose_target(corpus, list(corpus), need_train=1000, need_val=100) == "eu"  # cy too small
    assert choose_target(corpus, list(corpus), need_train=10, need_val=1) == "cy"
    assert choose_target(corpus, list(corpus), 10, 1, preferred="de") == "de"
    with pytest.raises(ExperimentError, match="pass --target"):
        choose_target({"en": dd(10 ** 6), "de": dd(10 ** 6)}, ["en", "de"], 10, 1)
    with pytest.raises(ExperimentError, match="not among"):
        choose_target(corpus, list(corpus), 10, 1, preferred="fr")


def test_demo_config_rejects_unknown_settings(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"train_tokens": 10, "lernrate": 3}))
    assert main(["demo", "--config", str(cfg), "--out", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert "lernrate" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- real model (slow)
def _load_example():
    spec = importlib.util.spec_from_file_location("lape_ablation_example", REPO / "examples" / "ablation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_deactivating_language_neurons_hurts_that_language_most(tmp_path):
    """LAPE's finding on Gemma-3-270M with the built-in corpus: zeroing language k's neurons
    raises k's perplexity more than the other languages' (on average over k), and more than a
    random set of the same size does."""
    ablation = _load_example()
    r = ablation.run_ablation("gemma3-270m", ["en", "de", "ru", "cy"], str(tmp_path / "abl"), tokens=8192,
                              val_tokens=1024, top_rate=0.01, batch_size=2, quiet=True)
    s = r["summary"]
    assert (tmp_path / "abl" / "ablation.md").exists() and (tmp_path / "abl" / "ablation.png").exists()
    assert s["mean_diagonal_change"] > s["mean_off_diagonal_change"], s
    assert s["mean_diagonal_change"] > s["mean_random_diagonal_change"], s
    assert s["diagonal_dominates_rows"] >= len(r["lape_change"]) - 1, s
