"""identify() against an independent transcription of the LAPE reference selection.

The oracle below follows the published reference script (RUCAIBox/Language-Specific-Neurons,
identify.py) operation by operation: stacked [L, I, K] counts, integer true division,
NaN-to-zero normalisation, entropy with 0 log 0 = 0, kthvalue filter, topk(largest=False),
activation bar, then the (lang, index) grouping by bincount/split and the per-language sort of
(layer, neuron) tuples. Its output keeps the reference's quirk of dropping trailing languages
that got no neurons.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lape_kernels.neurons import identify, lape_probabilities


def oracle(ns, over_zeros, top_rate, filter_rate, activation_bar_ratio):
    """Reference LAPE selection -> list[lang][layer] of int64 tensors (trailing empties dropped)."""
    n = torch.tensor(ns)
    over_zero = torch.stack(over_zeros, dim=-1)
    num_layers, intermediate_size, lang_num = over_zero.size()

    probs = over_zero / n
    normed = probs / probs.sum(dim=-1, keepdim=True)
    normed[torch.isnan(normed)] = 0
    log_probs = torch.where(normed > 0, normed.log(), 0)
    entropy = -torch.sum(normed * log_probs, dim=-1)
    assert not torch.isnan(entropy).any()

    flat = probs.flatten()
    filter_value = flat.kthvalue(round(len(flat) * filter_rate)).values.item()
    over = (probs > filter_value).sum(dim=-1)
    entropy[over == 0] = torch.inf

    flat_entropy = entropy.flatten()
    count = round(len(flat_entropy) * top_rate)
    _, index = flat_entropy.topk(count, largest=False)
    rows = index // entropy.size(1)
    cols = index % entropy.size(1)
    chosen = probs[rows, cols].transpose(0, 1)  # lang x selected
    bar = flat.kthvalue(round(len(flat) * activation_bar_ratio)).values.item()
    lang_ids, positions = torch.where(chosen > bar)

    pairs = torch.stack((rows, cols), dim=-1)
    result = []
    for group in positions.split(torch.bincount(lang_ids).tolist()):
        items = sorted(tuple(r.tolist()) for r in pairs[group])
        per_layer = [[] for _ in range(num_layers)]
        for layer, neuron in items:
            per_layer[layer].append(neuron)
        result.append([torch.tensor(v).long() for v in per_layer])
    return result, probs, filter_value, bar


def assert_matches_oracle(stats_dict, top_rate, filter_rate, bar):
    langs = list(stats_dict)
    got = identify(stats_dict, top_rate, filter_rate, bar)
    want, probs, filter_value, bar_value = oracle(
        [stats_dict[k]["n"] for k in langs], [stats_dict[k]["over_zero"] for k in langs], top_rate, filter_rate, bar)
    assert torch.equal(lape_probabilities(stats_dict), probs)
    assert got.thresholds["filter_value"] == filter_value
    assert got.thresholds["activation_bar"] == bar_value
    assert got.languages == langs
    assert len(want) <= len(langs)
    L = next(iter(stats_dict.values()))["over_zero"].shape[0]
    for k, lang in enumerate(langs):
        layers = got[lang]
        assert len(layers) == L
        expected = want[k] if k < len(want) else [torch.empty(0, dtype=torch.int64)] * L
        for a, b in zip(layers, expected):
            assert a.dtype == torch.int64
            assert torch.equal(a, b), (lang, a, b)
    return got


def make_stats(seed, L, I, K, mode, n_max=1000, differing_n=True):
    g = torch.Generator().manual_seed(seed)
    ns = [int(torch.randint(1, n_max + 1, (1,), generator=g)) if differing_n else n_max for _ in range(K)]
    out = {}
    for k in range(K):
        n = ns[k]
        if mode == "ties":  # few distinct values: many equal probabilities and entropies
            oz = torch.randint(0, 3, (L, I), generator=g) * (n // 2)
        elif mode == "sparse":  # mostly zero, a few active: 0 log 0, NaN rows, inf entropies
            oz = torch.randint(0, n + 1, (L, I), generator=g) * (torch.rand(L, I, generator=g) < 0.2)
        else:
            oz = torch.randint(0, n + 1, (L, I), generator=g)
        out[f"l{k}"] = {"n": n, "over_zero": oz.long()}
    return out


rates = st.sampled_from([0.01, 0.05, 0.1, 0.25, 0.5, 0.9, 0.95, 0.99, 1.0])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), L=st.integers(1, 5), I=st.integers(1, 40), K=st.integers(1, 6),
       mode=st.sampled_from(["uniform", "ties", "sparse"]), differing_n=st.booleans(),
       top_rate=rates, filter_rate=rates, bar=rates)
def test_matches_reference_random(seed, L, I, K, mode, differing_n, top_rate, filter_rate, bar):
    stats = make_stats(seed, L, I, K, mode, n_max=50 if mode == "ties" else 1000, differing_n=differing_n)
    N = L * I * K
    if round(L * I * top_rate) == 0 or round(N * filter_rate) == 0 or round(N * bar) == 0:
        with pytest.raises(ValueError, match="rate|selects"):
            identify(stats, top_rate, filter_rate, bar)
        return
    assert_matches_oracle(stats, top_rate, filter_rate, bar)


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_larger(seed):
    """Realistic-ish shape with a skewed language: hundreds of neurons selected."""
    stats = make_stats(seed, 8, 1536, 5, "uniform", n_max=100_000)
    got = assert_matches_oracle(stats, 0.01, 0.95, 0.95)
    assert sum(got.total(lang) for lang in got.languages) > 0
    got = assert_matches_oracle(stats, 0.05, 0.9, 0.9)


def test_large_token_counts_float32_division():
    """n above 2**24 is not exact in float32; the division must round exactly as the reference."""
    g = torch.Generator().manual_seed(3)
    stats = {}
    for k, n in enumerate([99_999_744, 16_777_217, 123_456_789]):
        stats[f"l{k}"] = {"n": n, "over_zero": torch.randint(0, n + 1, (4, 300), generator=g)}
    assert_matches_oracle(stats, 0.05, 0.95, 0.95)


def hand_stats():
    """L=1, I=8, K=4, n differs per language. Neuron 0: only l0; 1: only l1; 2: l0+l1 equally;
    3: l0 and l2 (l2 weaker); 4..7: low and spread. l3 never fires (empty, and it is the
    trailing language the reference would drop)."""
    oz = {
        "l0": [90, 0, 50, 80, 1, 1, 1, 1],
        "l1": [0, 180, 100, 0, 2, 1, 2, 1],
        "l2": [0, 0, 0, 30, 1, 1, 1, 1],
        "l3": [0, 0, 0, 0, 0, 0, 0, 0],
    }
    n = {"l0": 100, "l1": 200, "l2": 100, "l3": 50}
    return {k: {"n": n[k], "over_zero": torch.tensor([v])} for k, v in oz.items()}


def test_hand_example():
    stats = hand_stats()
    ns = assert_matches_oracle(stats, top_rate=0.5, filter_rate=0.75, bar=0.75)
    # p per neuron: n0 (.9,0,0,0) n1 (0,.9,0,0) n2 (.5,.5,0,0) n3 (.8,0,.3,0); bar = 24th of 32
    assert ns["l0"][0].tolist() == [0, 2, 3]
    assert ns["l1"][0].tolist() == [1, 2]  # neuron 2 belongs to two languages
    assert ns["l2"][0].tolist() == [3]
    assert ns["l3"][0].tolist() == []  # kept although empty (the reference drops it)
    assert ns.tokens_per_language == {"l0": 100, "l1": 200, "l2": 100, "l3": 50}
    assert ns.thresholds["top_rate"] == 0.5 and ns.thresholds["activation_bar_ratio"] == 0.75
    probs = lape_probabilities(stats)
    assert probs.dtype == torch.float32 and probs.shape == (1, 8, 4)
    assert ns.thresholds["activation_bar"] == probs.flatten().kthvalue(24).values.item()
    # the oracle really drops the trailing empty language
    assert len(oracle([s["n"] for s in stats.values()], [s["over_zero"] for s in stats.values()], 0.5, 0.75, 0.75)[0]) == 3


def test_python_round_half_to_even():
    """Counts use Python's round (half to even) like the reference: 2.5 -> 2, not 3."""
    stats = {"a": {"n": 100, "over_zero": torch.tensor([[90, 0, 60, 50, 1]])},
             "b": {"n": 100, "over_zero": torch.tensor([[0, 80, 30, 40, 2]])}}
    # N = 10: filter_rate 0.25 -> k = 2 (value 0); top_rate 0.5 -> 2 neurons; bar 0.25 -> k = 2 (0)
    ns = assert_matches_oracle(stats, top_rate=0.5, filter_rate=0.25, bar=0.25)
    assert ns["a"][0].tolist() == [0] and ns["b"][0].tolist() == [1]
    assert ns.thresholds["filter_value"] == 0.0 and ns.thresholds["activation_bar"] == 0.0
    ns = assert_matches_oracle(stats, top_rate=0.5, filter_rate=0.35, bar=0.35)  # 3.5 -> 4
    assert ns.thresholds["filter_value"] == ns.thresholds["activation_bar"] == torch.tensor(0.02).item()


def test_empty_middle_language_kept_in_place():
    stats = hand_stats()
    stats = {"l0": stats["l0"], "l3": stats["l3"], "l1": stats["l1"], "l2": stats["l2"]}
    ns = assert_matches_oracle(stats, 0.5, 0.75, 0.75)
    assert ns.languages == ["l0", "l3", "l1", "l2"] and ns.total("l3") == 0


def test_entropy_zero_log_zero_and_filter_inf():
    """Neurons active in one language only have entropy exactly 0 (0 log 0 = 0, not NaN); neurons
    nobody activates above the filter value get +inf and are picked only after all finite ones."""
    stats = {"a": {"n": 10, "over_zero": torch.tensor([[10, 0, 5, 1]])},
             "b": {"n": 10, "over_zero": torch.tensor([[0, 10, 5, 1]])}}
    ns = identify(stats, top_rate=0.5, filter_rate=0.5, activation_bar_ratio=0.5)
    # filter value = 4th smallest of [1,0, 0,1, .5,.5, .1,.1] = 0.1 -> neuron 3 has inf entropy
    assert ns["a"][0].tolist() == [0] and ns["b"][0].tolist() == [1]
    assert_matches_oracle(stats, 0.5, 0.5, 0.5)
    ns = assert_matches_oracle(stats, 1.0, 0.5, 0.5)
    assert ns["a"][0].tolist() == [0, 2] and ns["b"][0].tolist() == [1, 2]


def test_accepts_stats_objects_and_tensor_n():
    stats = make_stats(7, 3, 50, 3, "uniform")
    objs = {k: SimpleNamespace(over_zero=v["over_zero"].int(), n_tokens=v["n"], act_sum=None,
                               meta={"model_id": "tiny/model", "hidden_size": 64})
            for k, v in stats.items()}
    a = identify(stats, 0.1)
    b = identify(objs, 0.1)
    c = identify({k: {"n": torch.tensor(v["n"]), "over_zero": v["over_zero"]} for k, v in stats.items()}, 0.1)
    assert a == b == c
    assert b.model_id == "tiny/model" and b.hidden_size == 64 and a.model_id is None
    assert b.num_layers == 3 and b.intermediate_size == 50
    assert identify(objs, 0.1, model_id="other").model_id == "other"


def test_real_activation_stats():
    from lape_kernels.stats import ActivationStats, StatsByLanguage

    ref = make_stats(11, 2, 30, 3, "uniform")
    objs = StatsByLanguage(list(ref), {k: ActivationStats.from_lape_dict(v, meta={"model": "tiny/m"})
                                       for k, v in ref.items()})
    ns = identify(objs, 0.1)
    assert ns == identify(ref, 0.1) and ns.model_id == "tiny/m"
    assert ns.tokens_per_language == {k: v["n"] for k, v in ref.items()}


@pytest.mark.parametrize("bad, match", [
    ({}, "empty"),
    ({"a": {"n": 10, "over_zero": torch.zeros(2, 3, dtype=torch.long)},
      "b": {"n": 10, "over_zero": torch.zeros(2, 4, dtype=torch.long)}}, "shapes differ"),
    ({"a": {"n": 0, "over_zero": torch.zeros(2, 3, dtype=torch.long)}}, "n .* > 0"),
    ({"a": {"n": -5, "over_zero": torch.zeros(2, 3, dtype=torch.long)}}, r"stats\['a'\]: d\['n'\] must be >= 0"),
    ({"a": {"n": 10, "over_zero": -torch.ones(2, 3, dtype=torch.long)}}, "negative"),
    ({"a": {"n": 10, "over_zero": torch.full((2, 3), 11)}}, "above n"),
    ({"a": {"n": 10, "over_zero": torch.zeros(6, dtype=torch.long)}}, "2-D"),
    ({"a": {"n": 10}}, "keys 'n' and 'over_zero'"),
])
def test_bad_stats(bad, match):
    with pytest.raises(ValueError, match=match):
        identify(bad, top_rate=0.5)


def test_bad_stats_types():
    with pytest.raises(TypeError, match="ActivationStats"):
        identify({"a": 3})
    with pytest.raises(TypeError, match="mapping"):
        identify([{"n": 1, "over_zero": torch.zeros(1, 1, dtype=torch.long)}])
    with pytest.raises(TypeError, match="over_zero must be a tensor"):
        identify({"a": {"n": 1, "over_zero": [[0]]}})
    # wrong types are TypeErrors (ActivationStats' rules, which identify applies to every entry)
    with pytest.raises(TypeError, match=r"stats\['a'\]: d\['n'\] must be an int"):
        identify({"a": {"n": 2.5, "over_zero": torch.zeros(2, 3, dtype=torch.long)}})
    with pytest.raises(TypeError, match=r"stats\['a'\]: over_zero must be an integer tensor \(counts\)"):
        identify({"a": {"n": 10, "over_zero": torch.zeros(2, 3)}})


@pytest.mark.parametrize("kw", [{"top_rate": 0}, {"top_rate": 1.5}, {"filter_rate": -0.1},
                                {"activation_bar_ratio": 0.0}, {"filter_rate": float("nan")},
                                {"top_rate": True}])
def test_bad_rates(kw):
    stats = make_stats(0, 2, 10, 2, "uniform")
    with pytest.raises(ValueError, match="must be in \\(0, 1\\]"):
        identify(stats, **kw)


def test_selection_size_zero():
    stats = make_stats(0, 2, 10, 2, "uniform")
    with pytest.raises(ValueError, match="selects .* = 0 neurons"):
        identify(stats, top_rate=0.01)  # round(20 * 0.01) == 0
    with pytest.raises(ValueError, match="round\\(N \\* rate\\) == 0"):
        identify(stats, top_rate=1.0, filter_rate=0.01)  # round(40 * 0.01) == 0


def test_properties_of_result():
    """Independent of the oracle: selected neurons obey the definition."""
    stats = make_stats(21, 6, 400, 4, "uniform", n_max=5000)
    ns = identify(stats, top_rate=0.02, filter_rate=0.9, activation_bar_ratio=0.9)
    probs = lape_probabilities(stats)
    bar = ns.thresholds["activation_bar"]
    union = ns.union(ns.languages)
    assert sum(t.numel() for t in union) <= round(6 * 400 * 0.02)
    for k, lang in enumerate(ns.languages):
        for layer, idx in enumerate(ns[lang]):
            assert torch.equal(idx, torch.unique(idx))
            assert bool((probs[layer, idx, k] > bar).all())
    assert math.isclose(bar, probs.flatten().sort().values[round(probs.numel() * 0.9) - 1].item())


def test_full_llama_shape():
    """Llama-3.1-8B shape (32 x 14336, 12 languages, 10M tokens each), paper's top_rate 0.05."""
    g = torch.Generator().manual_seed(0)
    stats = {f"l{k}": {"n": 10_000_000, "over_zero": torch.randint(0, 10_000_001, (32, 14336), generator=g)}
             for k in range(12)}
    ns = assert_matches_oracle(stats, 0.05, 0.95, 0.95)
    assert ns.num_layers == 32 and ns.intermediate_size == 14336
    assert 0 < sum(t.numel() for t in ns.union(ns.languages)) <= round(32 * 14336 * 0.05)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_matches_reference_on_recorded_stats(family):
    """Real statistics: counts recorded through the patched model (fused kernel, padding and
    per-sequence languages) identify exactly what the reference algorithm picks from them."""
    from lape_kernels.testing import tiny_model

    import lape_kernels

    model = lape_kernels.patch(tiny_model(family, seed=3))
    gen = torch.Generator().manual_seed(7)
    langs = ["en", "cy", "eu", "is"]
    with lape_kernels.record(model, languages=langs) as stats:
        for step in range(3):
            ids = torch.randint(3, 256, (4, 24), generator=gen)
            mask = torch.ones_like(ids)
            mask[step % 4, : 5 + step] = 0  # left padding on one row
            # each language draws from its own slice of the vocabulary, so the counts differ
            ids = (ids % 60) + 3 + 60 * torch.arange(4).unsqueeze(1)
            stats.set_batch_languages(torch.arange(4))
            model(ids, attention_mask=mask)
    as_dicts = {k: v.to_lape_dict() for k, v in stats.items()}
    for top_rate in (0.02, 0.05, 0.2):
        assert_matches_oracle(as_dicts, top_rate, 0.95, 0.95)
        assert identify(stats, top_rate) == identify(as_dicts, top_rate)
