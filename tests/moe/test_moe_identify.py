"""LAPE identification over (layer, expert, neuron) units and NeuronSet's expert neurons.

Independent checks: with every token routed to every expert (routed == n), expert probabilities
are the dense rule's ``over_zero / n``, so identify() on MoE statistics must select exactly what
the dense path (checked against the reference transcription in tests/neurons) selects when the
expert units are appended as extra layers: one ranking over all units.
"""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lape_kernels as lk
from lape_kernels.neurons import ExpertLayout, NeuronSetFormatError, expert_probabilities
from lape_kernels.stats.experts import ExpertStats
from lape_kernels.testing import random_batch, tiny_model


def _expert_set(**kw):
    ex = {"en": [[torch.tensor([3, 1]), torch.tensor([], dtype=torch.int64)], [torch.tensor([0]), torch.tensor([31])]],
          "mt": [[torch.tensor([2]), torch.tensor([5])], [torch.tensor([], dtype=torch.int64), torch.tensor([4, 9])]]}
    dense = {"en": [torch.tensor([1]), torch.tensor([], dtype=torch.int64)], "mt": [torch.tensor([1, 2]), torch.tensor([7])]}
    args = dict(experts=ex, expert_layout=((1, 3), 2, 32), model_id="m", hidden_size=8)
    args.update(kw)
    return lk.NeuronSet(dense, 2, 16, **args)


def test_expert_neuron_set_access_and_round_trip(tmp_path):
    ns = _expert_set()
    assert ns.has_experts and ns.expert_layers == (1, 3)
    assert ns.expert_layout == ExpertLayout((1, 3), 2, 32)
    assert any("(0, 0)" in n and "not sorted" in n for n in ns.notes)
    sel = ns.select_experts("en")
    assert [[t.tolist() for t in row] for row in sel] == [[[1, 3], []], [[0], [31]]]
    assert all(t.dtype == torch.int64 for row in sel for t in row)
    sel[0][0][0] = 30  # a copy: the set is unchanged
    assert ns.select_experts("en")[0][0].tolist() == [1, 3]
    assert torch.equal(ns.expert_counts("mt"), torch.tensor([[1, 1], [0, 2]]))
    assert ns.total("en") == 1 + 4 and ns.total("mt") == 3 + 4
    assert ns.num_units == 2 * 16 + 2 * 2 * 32
    assert torch.equal(ns.overlap(), torch.tensor([[5, 1], [1, 7]]))  # dense neuron 1 of layer 0
    assert ns.trainable_params("mt") == 3 * 8 * 7
    assert list(ns.experts) == ["en", "mt"]

    for name in ("dir", "pair.safetensors"):
        ns.save(tmp_path / name)
        back = lk.NeuronSet.load(tmp_path / name)
        assert back == ns and back.expert_layout == ns.expert_layout
        assert back.model_id == "m" and back.hidden_size == 8
    meta = json.loads((tmp_path / "dir" / "neurons.json").read_text())
    assert meta["format_version"] == 2
    assert meta["experts"] == {"layers": [1, 3], "num_experts": 2, "intermediate_size": 32}
    # a dense set keeps version 1 (older readers still read it)
    lk.NeuronSet({"en": [torch.tensor([1])]}, 1, 4).save(tmp_path / "dense")
    assert json.loads((tmp_path / "dense" / "neurons.json").read_text())["format_version"] == 1
    with pytest.raises(ValueError, match="reference format .* has no expert neurons.*format='lape'"):
        ns.save(tmp_path / "ref.pt", format="reference")
    assert not (tmp_path / "ref.pt").exists()
    assert ns != lk.NeuronSet({"en": ns["en"], "mt": ns["mt"]}, 2, 16)  # the same dense neurons, no experts


def test_moe_set_without_dense_mlps(tmp_path):
    ex = {"a": [[torch.tensor([1]), torch.tensor([2])]]}
    ns = lk.NeuronSet({"a": []}, 0, 0, experts=ex, expert_layout=((0,), 2, 4))
    assert ns.layer_counts("a") == [] and ns.total("a") == 2 and ns.num_units == 8
    ns.save(tmp_path / "s")
    assert lk.NeuronSet.load(tmp_path / "s") == ns
    with pytest.raises(ValueError, match="num_layers must be a positive int .0 only with expert neurons"):
        lk.NeuronSet({"a": []}, 0, 0)
    with pytest.raises(ValueError, match="no expert neurons"):
        lk.NeuronSet({"a": [torch.tensor([1])]}, 1, 4).select_experts("a")


@pytest.mark.parametrize("kw, error, match", [
    (dict(expert_layout=None), ValueError, "go together"),
    (dict(experts={"en": []}), ValueError, "same languages as neurons"),
    (dict(expert_layout=((3, 1), 2, 32)), ValueError, r"layers must be a non-empty sorted list"),
    (dict(expert_layout=((1, 3), 0, 32)), ValueError, "num_experts must be a positive int"),
    (dict(expert_layout=((1, 3), 2, 16)), ValueError, r"experts\['en'\]\[moe layer 1 = decoder layer 3\]\[expert 1\]: "
                                                       r"index 31 out of range \[0, 16\)"),
    (dict(expert_layout=((1, 3, 5), 2, 32)), ValueError, r"experts\['en'\] .one entry per MoE layer .1, 3, 5.. has 2"),
    (dict(expert_layout=((1, 3), 3, 32)), ValueError, r"\[moe layer 0\] .one entry per expert. has 2 entries, expected 3"),
    (dict(expert_layout="x"), TypeError, "expert_layout must be an ExpertLayout"),
])
def test_bad_expert_neurons_are_clear_errors(kw, error, match):
    with pytest.raises(error, match=match):
        _expert_set(**kw)


def test_bad_expert_files_are_clear_errors(tmp_path):
    ns = _expert_set()
    ns.save(tmp_path / "s")
    meta_path = tmp_path / "s" / "neurons.json"
    meta = json.loads(meta_path.read_text())
    del meta["experts"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(NeuronSetFormatError, match=r"neurons.json: 'experts' must be an ExpertLayout"):
        lk.NeuronSet.load(tmp_path / "s")
    meta["experts"] = {"layers": [1, 3], "num_experts": 3, "intermediate_size": 32}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(NeuronSetFormatError, match=r"experts.offsets.0 must be int64 \[moe layers \* experts \+ 1 = 7\]"):
        lk.NeuronSet.load(tmp_path / "s")
    meta["format_version"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(NeuronSetFormatError, match="format_version 3 not supported"):
        lk.NeuronSet.load(tmp_path / "s")


def _stats(dense_oz, n, ex_oz, routed, layers):
    return lk.ActivationStats(dense_oz, None, n, experts=ExpertStats(layers, ex_oz, None, routed))


def _random_stats(g, n, L, I, M, E, routed=None):
    dense = torch.randint(0, n + 1, (L, I), generator=g)
    if routed is None:
        routed = torch.randint(0, n + 1, (M, E), generator=g)
    ex = (torch.rand(M, E, I, generator=g) * (routed[..., None] + 1)).long().clamp(max=routed[..., None])
    return dense, ex, routed


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dense_layers", [0, 2])
def test_one_ranking_equals_the_dense_rule_on_appended_units(seed, dense_layers):
    """routed == n: expert units are dense units of extra layers; the sets must agree exactly."""
    g = torch.Generator().manual_seed(seed)
    L, I, M, E = dense_layers, 8, 2, 3
    stats, flat = {}, {}
    for lang, n in (("en", 50), ("de", 37), ("mt", 64)):
        dense, ex, routed = _random_stats(g, n, L, I, M, E, routed=torch.full((M, E), n))
        stats[lang] = _stats(dense, n, ex, routed, (1, 2))
        flat[lang] = lk.ActivationStats(torch.cat([dense, ex.view(M * E, I)]), None, n)
    ns = lk.identify(stats, top_rate=0.2, filter_rate=0.5, activation_bar_ratio=0.7)
    ref = lk.identify(flat, top_rate=0.2, filter_rate=0.5, activation_bar_ratio=0.7)
    assert ns.expert_layout == ExpertLayout((1, 2), E, I) and ns.num_layers == L
    assert ns.thresholds == ref.thresholds
    for lang in stats:
        assert [t.tolist() for t in ns[lang]] == [t.tolist() for t in ref[lang][:L]]
        assert [t.tolist() for row in ns.select_experts(lang) for t in row] == [t.tolist() for t in ref[lang][L:]]
    assert sum(ns.total(l) for l in ns) > 0


def test_probability_is_relative_to_routed_tokens():
    """Scaling one expert's routed tokens and counts for a language changes nothing; dividing by
    the language's tokens instead would (its routing frequency would enter the probability)."""
    g = torch.Generator().manual_seed(7)
    base = {lang: _random_stats(g, n, 1, 8, 2, 3) + (n,) for lang, n in (("en", 40), ("mt", 40))}
    stats = {lang: _stats(d, n, ex, r, (0, 1)) for lang, (d, ex, r, n) in base.items()}
    d, ex, r, n = base["mt"]
    r2, ex2 = r.clone(), ex.clone()
    r2[1, 2], ex2[1, 2] = 2 * r[1, 2], 2 * ex[1, 2]
    scaled = dict(stats, mt=_stats(2 * d, 2 * n, ex2, r2, (0, 1)))  # dense counts doubled with n: same probabilities
    p, q = expert_probabilities(stats), expert_probabilities(scaled)
    assert torch.equal(p, q)
    want = ex[1, 2].double() / r[1, 2].double()
    if int(r[1, 2]):
        torch.testing.assert_close(p[1, 2, :, 1].double(), want, rtol=1e-7, atol=0)
    assert lk.identify(stats, 0.2, 0.5, 0.7) == lk.identify(scaled, 0.2, 0.5, 0.7)


def test_expert_no_language_routes_to():
    """routed == 0 for a language: probability 0 there (no NaN), noted; a neuron active only in
    the language that does route to the expert is that language's."""
    L, I, M, E = 1, 4, 1, 2
    routed = {"en": torch.tensor([[10, 10]]), "mt": torch.tensor([[10, 0]])}
    ex = {"en": torch.tensor([[[5, 5, 5, 5], [0, 0, 9, 1]]]), "mt": torch.tensor([[[5, 5, 5, 5], [0, 0, 0, 0]]])}
    dense = torch.full((L, I), 5)
    stats = {lang: _stats(dense, 20, ex[lang], routed[lang], (0,)) for lang in ("en", "mt")}
    p = expert_probabilities(stats)
    assert not torch.isnan(p).any() and torch.equal(p[0, 1, :, 1], torch.zeros(I))
    ns = lk.identify(stats, top_rate=0.1, filter_rate=0.8, activation_bar_ratio=0.8)
    assert any("1 (MoE layer, expert, language) triples had no token routed" in n for n in ns.notes)
    assert [t.tolist() for t in ns.select_experts("en")[0]] == [[], [2]]
    assert ns.total("mt") == 0


def test_identify_bad_expert_statistics():
    g = torch.Generator().manual_seed(1)
    d, ex, r = _random_stats(g, 20, 1, 8, 2, 3)
    a = _stats(d, 20, ex, r, (0, 1))
    with pytest.raises(ValueError, match="different experts"):
        lk.identify({"en": a, "mt": _stats(d, 20, ex, r, (0, 2))})
    with pytest.raises(ValueError, match="different experts"):
        lk.identify({"en": a, "mt": lk.ActivationStats(d, None, 20)})
    with pytest.raises(ValueError, match="no experts"):
        expert_probabilities({"en": lk.ActivationStats(d, None, 20)})
    with pytest.raises(ValueError, match=r"not empty \(empty only for a mixture-of-experts"):
        lk.identify({"en": lk.ActivationStats(torch.zeros(0, 0, dtype=torch.int64), None, 20)})


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_record_identify_save_load_on_tiny_moe(family, tmp_path):
    """patch -> record (two languages, left padding) -> identify -> save -> load -> validate;
    another model's set is refused (fingerprint), a dense model's shape too."""
    model = tiny_model(family, num_layers=2)
    ids, mask = random_batch(4, 12, seed=2, padding="left")
    with lk.record(model, ["en", "mt"]) as stats:
        stats.set_batch_languages(torch.tensor([0, 1, 1, 0]))
        model(input_ids=ids, attention_mask=mask)
    ns = lk.identify({lang: stats[lang] for lang in ("en", "mt")}, top_rate=0.1, filter_rate=0.5, activation_bar_ratio=0.5)
    shape = lk.introspection.expert_shape(model)
    assert ns.expert_layout == ExpertLayout(shape.layers, shape.num_experts, shape.intermediate_size)
    assert ns.num_layers == (2 if family == "qwen2_moe" else 0)  # the shared expert is the dense MLP
    assert ns.num_units == 2 * (ns.intermediate_size or 0) + 2 * shape.num_experts * shape.intermediate_size
    assert 0 < ns.total("en") + ns.total("mt")
    assert len(torch.cat([t for row in ns.select_experts("en") for t in row] + ns["en"]).unique()) <= \
        round(ns.num_units * 0.1)
    assert ns.model_fingerprint == lk.model_fingerprint(model)
    ns.save(tmp_path / "ns")
    back = lk.NeuronSet.load(tmp_path / "ns")
    assert back == ns
    back.validate(model)
    with pytest.raises(lk.ModelMismatchError):
        back.validate(tiny_model(family, seed=1, num_layers=2))
    with pytest.raises(ValueError, match="the model has no mixture-of-experts layers"):
        back.validate(tiny_model("llama", num_layers=2), allow_other_model=True)
    with pytest.raises(TypeError, match="validate it against the model"):
        back.validate(model.config)


def test_transfer_to_carries_expert_neurons():
    model, other = tiny_model("mixtral", num_layers=2), tiny_model("mixtral", seed=5, num_layers=2)
    shape = lk.introspection.expert_shape(model)
    ex = [[torch.tensor([e, 10 + e]) for e in range(shape.num_experts)] for _ in shape.layers]
    ns = lk.NeuronSet({"a": []}, 0, 0, experts={"a": ex}, expert_layout=(shape.layers, shape.num_experts,
                                                                          shape.intermediate_size),
                      model_fingerprint=lk.model_fingerprint(model))
    with pytest.raises(lk.ModelMismatchError):
        ns.validate(other)
    moved = ns.transfer_to(other)
    assert moved == ns and moved.model_fingerprint == lk.model_fingerprint(other)
    assert any("transferred by transfer_to" in n for n in moved.notes)
    moved.validate(other)
    with pytest.raises(ValueError, match=r"MoE layers \[0, 1\] of 4 experts of intermediate size 32; the model has "
                                         r"MoE layers \[0, 1, 2\]"):
        ns.transfer_to(tiny_model("mixtral", num_layers=3))


@st.composite
def _moe_sets(draw):
    M, E, I_e = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 9))
    L = draw(st.integers(0, 2))
    layers = sorted(draw(st.sets(st.integers(0, 6), min_size=M, max_size=M)))
    langs = draw(st.lists(st.sampled_from(["en", "mt", "cy", "de"]), min_size=1, max_size=3, unique=True))
    pick = lambda n: sorted(draw(st.sets(st.integers(0, n - 1), max_size=n)))  # noqa: E731
    dense = {l: [pick(5) for _ in range(L)] for l in langs}
    experts = {l: [[pick(I_e) for _ in range(E)] for _ in range(M)] for l in langs}
    return lk.NeuronSet(dense, L, 5 if L else 0, experts=experts, expert_layout=(layers, E, I_e))


@settings(max_examples=30, deadline=None)
@given(ns=_moe_sets(), seed=st.integers(0, 2**16))
def test_round_trip_and_random_baselines_property(ns, seed):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        ns.save(f"{d}/s")
        back = lk.NeuronSet.load(f"{d}/s")
    assert back == ns and back.expert_layout == ns.expert_layout
    lang = ns.languages[0]
    lay = ns.expert_layout
    for mode in ("per_layer", "total"):
        dense, experts = ns.random_experts_like(lang, seed, mode)
        again = lk.NeuronSet({lang: dense}, ns.num_layers, ns.intermediate_size, experts={lang: experts},
                             expert_layout=lay)  # the one rule: in range, unique
        assert not again.notes  # sorted
        assert again.total(lang) == ns.total(lang)
        if mode == "per_layer":
            assert torch.equal(again.expert_counts(lang), ns.expert_counts(lang))
            assert again.layer_counts(lang) == ns.layer_counts(lang)
        replay = ns.random_experts_like(lang, seed, mode)[1]  # deterministic for a seed
        assert [[t.tolist() for t in r] for r in replay] == [[t.tolist() for t in r] for r in experts]
