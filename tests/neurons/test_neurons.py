"""NeuronSet: construction checks, set ops, random baselines, both file formats (with the real
masks released with the paper), refusal of bad files, reporting, and `deactivate`."""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lape_kernels.introspection import model_shape
from lape_kernels.neurons import NeuronSet, NeuronSetFormatError, per_layer_table, plot_heatmap

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
MASKS = SHARED / "data" / "released-masks"
LANGS = ["mt", "af", "is", "cy", "mk", "lv", "lt", "sl", "sk", "et", "ka", "ne"]
# from shared/data/released-masks/README.md (also cross-checked against the README below)
TOTALS = {
    "llama-3.1-5": [3015, 2581, 5033, 6020, 1743, 3212, 2978, 2046, 1940, 3204, 1150, 4625],
    "nemo-5": [3611, 3557, 5644, 8239, 2403, 3741, 3840, 2365, 2310, 3815, 2028, 5567],
}
SHAPES = {"llama-3.1-5": (32, 14336), "nemo-5": (40, 14336)}

needs_masks = pytest.mark.skipif(not MASKS.is_dir(), reason=f"released masks not found at {MASKS} "
                                 "(tests expect a copy of shared/ beside the repository)")


def small_set(**kw):
    return NeuronSet({"a": [[0, 2, 5], [], [1]], "b": [[2, 3], [7], [1, 9]], "c": [[], [], []]}, 3, 10, **kw)


# ------------------------------------------------------------------ construction
def test_basic_access():
    ns = small_set(model_id="m", hidden_size=16)
    assert ns.languages == ["a", "b", "c"] and len(ns) == 3 and "a" in ns and "z" not in ns
    assert ns.layer_counts("a") == [3, 0, 1] and ns.total("b") == 5 and ns.total("c") == 0
    for t in ns["a"]:
        assert t.dtype == torch.int64 and t.dim() == 1
    assert ns["a"][0].tolist() == [0, 2, 5]
    sel = ns.select("a")
    sel[0][0] = 9
    assert ns["a"][0].tolist() == [0, 2, 5]  # select returns copies
    assert ns.select("b", device="cpu")[2].tolist() == [1, 9]
    with pytest.raises(KeyError, match="'z' not in this NeuronSet"):
        ns["z"]
    assert "a=4" in repr(ns)


def test_unsorted_is_sorted_with_note():
    ns = NeuronSet({"a": [torch.tensor([5, 1, 3], dtype=torch.int32)]}, 1, 8)
    assert ns["a"][0].tolist() == [1, 3, 5] and ns["a"][0].dtype == torch.int64
    assert any("not sorted" in n for n in ns.notes)
    assert not NeuronSet({"a": [[1, 3]]}, 1, 8).notes


@pytest.mark.parametrize("neurons, L, I, exc, match", [
    ({"a": [[0, 10]]}, 1, 10, ValueError, "index 10 out of range"),
    ({"a": [[-1, 3]]}, 1, 10, ValueError, "index -1 out of range"),
    ({"a": [[3, 1, 3]]}, 1, 10, ValueError, "duplicate index 3"),
    ({"a": [[1, 1]]}, 1, 10, ValueError, "duplicate index 1"),
    ({"a": [torch.tensor([1.0, 2.0])]}, 1, 10, TypeError, "integer dtype"),
    ({"a": [torch.tensor([True])]}, 1, 10, TypeError, "integer dtype"),
    ({"a": [[1.0]]}, 1, 10, TypeError, "must be integers"),
    ({"a": [torch.zeros(2, 2, dtype=torch.long)]}, 1, 10, ValueError, "1-D"),
    ({"a": [[1], [2]]}, 3, 10, ValueError, "2 layers, expected num_layers=3"),
    ({"a": torch.tensor([1, 2])}, 1, 10, TypeError, "one index tensor per layer"),
    ({"a": ["12"]}, 1, 10, TypeError, "expected a 1-D integer tensor"),
    ({3: [[1]]}, 1, 10, TypeError, "non-empty strings"),
    ({"": [[1]]}, 1, 10, ValueError, "non-empty strings"),
    ({"a": [[1]]}, 0, 10, ValueError, "num_layers"),
    ({"a": [[1]]}, 1, 0, ValueError, "intermediate_size"),
    ([[[1]]], 1, 10, TypeError, "mapping"),
])
def test_construction_errors(neurons, L, I, exc, match):
    with pytest.raises(exc, match=match):
        NeuronSet(neurons, L, I)


# ------------------------------------------------------------------ set operations
def test_set_ops_small():
    ns = small_set()
    assert [t.tolist() for t in ns.union(["a", "b"])] == [[0, 2, 3, 5], [7], [1, 9]]
    assert [t.tolist() for t in ns.intersection(["a", "b"])] == [[2], [], [1]]
    assert [t.tolist() for t in ns.union("a")] == [[0, 2, 5], [], [1]]
    assert [t.tolist() for t in ns.intersection(["a", "b", "c"])] == [[], [], []]
    assert ns.overlap().tolist() == [[4, 2, 0], [2, 5, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="at least one"):
        ns.union([])
    with pytest.raises(KeyError):
        ns.intersection(["a", "q"])


def test_trainable_params():
    ns = small_set(hidden_size=16)
    assert ns.trainable_params("a") == 3 * 16 * 4
    assert ns.trainable_params("a", hidden_size=32) == 3 * 32 * 4
    assert ns.trainable_fraction("b", 16, 24_000) == 3 * 16 * 5 / 24_000
    with pytest.raises(ValueError, match="hidden_size unknown"):
        small_set().trainable_params("a")
    with pytest.raises(ValueError, match="total_params"):
        ns.trainable_fraction("a", 16, 0)


def test_random_like_small_and_errors():
    ns = small_set()
    with pytest.raises(ValueError, match="mode must be"):
        ns.random_like("a", 0, mode="bogus")
    no_shape = NeuronSet({"a": [[1]]}, 1, None)
    with pytest.raises(ValueError, match="intermediate_size unknown"):
        no_shape.random_like("a", 0)
    full = NeuronSet({"a": [list(range(10))]}, 1, 10)
    assert full.random_like("a", 3)[0].tolist() == list(range(10))
    assert full.random_like("a", 3, mode="total")[0].tolist() == list(range(10))


# ------------------------------------------------------------------ validate
def test_validate_shapes_and_configs():
    from transformers import Gemma3Config, LlamaConfig

    ns = small_set()
    assert ns.validate(num_layers=3, intermediate_size=10) is ns
    ns.validate(LlamaConfig(num_hidden_layers=3, intermediate_size=10, hidden_size=8, num_attention_heads=2))
    with pytest.raises(ValueError, match="layer count mismatch: neuron set has 3 layers, model has 4"):
        ns.validate(num_layers=4)
    with pytest.raises(ValueError, match="intermediate_size mismatch"):
        ns.validate(LlamaConfig(num_hidden_layers=3, intermediate_size=12, hidden_size=8, num_attention_heads=2))
    with pytest.raises(ValueError, match="needs a model"):
        ns.validate()
    with pytest.raises(ValueError, match="not both"):
        ns.validate(LlamaConfig(), num_layers=3)
    loose = NeuronSet({"a": [[0], [9], []]}, 3, None)
    loose.validate(num_layers=3, intermediate_size=10)
    with pytest.raises(ValueError, match=r"a layer 1: index 9 out of range \[0, 8\)"):
        loose.validate(intermediate_size=8)
    g3 = Gemma3Config()
    L, I = g3.text_config.num_hidden_layers, g3.text_config.intermediate_size
    assert model_shape(g3) == (L, I)
    NeuronSet({"a": [[I - 1]] * L}, L, I).validate(g3)
    with pytest.raises(TypeError, match="cannot read"):
        model_shape(object())


# ------------------------------------------------------------------ our format
def _same(a: NeuronSet, b: NeuronSet):
    assert a == b
    for lang in a.languages:
        for x, y in zip(a[lang], b[lang]):
            assert x.dtype == y.dtype == torch.int64 and torch.equal(x, y)
    for attr in ("model_id", "hidden_size", "thresholds", "tokens_per_language", "notes"):
        assert getattr(a, attr) == getattr(b, attr), attr


def test_lape_format_roundtrip_dir_and_pair(tmp_path):
    ns = small_set(model_id="org/model", hidden_size=16,
                   thresholds={"top_rate": 0.01, "activation_bar": 0.123456789},
                   tokens_per_language={"a": 5, "b": 7, "c": 1})
    out = ns.save(tmp_path / "dir")
    assert (out / "neurons.json").is_file() and (out / "neurons.safetensors").is_file()
    meta = json.loads((out / "neurons.json").read_text())
    assert meta["format_version"] == 1 and meta["languages"] == ["a", "b", "c"] and meta["totals"]["b"] == 5
    _same(NeuronSet.load(out), ns)
    ns.save(tmp_path / "pair" / "x.safetensors")
    _same(NeuronSet.load(tmp_path / "pair" / "x.safetensors"), ns)
    _same(NeuronSet.load(tmp_path / "pair" / "x.json"), ns)
    for ext in (".json", ".safetensors"):  # a renamed pair still loads
        (tmp_path / "pair" / f"x{ext}").rename(tmp_path / "pair" / f"y{ext}")
    _same(NeuronSet.load(tmp_path / "pair" / "y.json"), ns)
    with pytest.raises(ValueError, match="do not match"):
        NeuronSet.load(out, languages=["x", "y", "z"])
    with pytest.raises(ValueError, match="made for model 'org/model', not 'other'"):
        NeuronSet.load(out, model_id="other")
    assert NeuronSet.load(out, intermediate_size=10) == ns
    with pytest.raises(ValueError, match="intermediate_size mismatch"):
        NeuronSet.load(out, intermediate_size=11)
    with pytest.raises(ValueError, match="format must be"):
        ns.save(tmp_path / "q", format="npz")


idx_lists = st.lists(st.integers(0, 49), unique=True, max_size=12)


@settings(max_examples=30, deadline=None)
@given(data=st.dictionaries(st.text("abcxyz-_", min_size=1, max_size=4), st.lists(idx_lists, min_size=3, max_size=3),
                            min_size=1, max_size=4))
def test_roundtrip_property(tmp_path_factory, data):
    ns = NeuronSet(data, 3, 50)
    d = tmp_path_factory.mktemp("rt")
    _same(NeuronSet.load(ns.save(d / "ours")), ns)
    ref = NeuronSet.load(ns.save(d / "ref.pt", format="reference"), languages=ns.languages, intermediate_size=50)
    assert ref == ns


def test_lape_format_bad_files(tmp_path):
    ns = small_set()
    good = ns.save(tmp_path / "good")
    meta = json.loads((good / "neurons.json").read_text())

    def variant(name, mutate_meta=None, tensors=None):
        d = tmp_path / name
        d.mkdir()
        m = json.loads(json.dumps(meta))
        if mutate_meta:
            mutate_meta(m)
        (d / "neurons.json").write_text(json.dumps(m))
        if tensors is not None:
            from safetensors.torch import save_file
            save_file(tensors, str(d / "neurons.safetensors"))
        else:
            (d / "neurons.safetensors").write_bytes((good / "neurons.safetensors").read_bytes())
        return d

    with pytest.raises(NeuronSetFormatError, match="format_version 99 not supported"):
        NeuronSet.load(variant("v", lambda m: m.update(format_version=99)))
    with pytest.raises(NeuronSetFormatError, match="not a lape_kernels neuron set"):
        NeuronSet.load(variant("f", lambda m: m.update(format="other")))
    with pytest.raises(NeuronSetFormatError, match="missing key 'num_layers'"):
        NeuronSet.load(variant("k", lambda m: m.pop("num_layers")))
    with pytest.raises(NeuronSetFormatError, match="out of range"):
        NeuronSet.load(variant("r", lambda m: m.update(intermediate_size=6)))
    with pytest.raises(NeuronSetFormatError, match="missing 'indices.3'"):
        NeuronSet.load(variant("l", lambda m: m.update(languages=["a", "b", "c", "d"])))
    bad_off = {"indices.0": torch.tensor([1, 2, 3]), "offsets.0": torch.tensor([0, 2, 1, 3])}
    with pytest.raises(NeuronSetFormatError, match="not a valid offset table"):
        NeuronSet.load(variant("o", lambda m: m.update(languages=["a"]), tensors=bad_off))
    with pytest.raises(NeuronSetFormatError, match="offsets.0 must be int64"):
        NeuronSet.load(variant("o2", lambda m: m.update(languages=["a"]),
                               tensors={"indices.0": torch.tensor([1]), "offsets.0": torch.tensor([0, 1])}))
    with pytest.raises(NeuronSetFormatError, match="duplicate index"):
        NeuronSet.load(variant("d", lambda m: m.update(languages=["a"]),
                               tensors={"indices.0": torch.tensor([1, 1]), "offsets.0": torch.tensor([0, 2, 2, 2])}))
    with pytest.raises(NeuronSetFormatError, match="integer dtype"):
        NeuronSet.load(variant("fl", lambda m: m.update(languages=["a"]),
                               tensors={"indices.0": torch.tensor([1.0]), "offsets.0": torch.tensor([0, 1, 1, 1])}))
    d = tmp_path / "nojson"
    d.mkdir()
    with pytest.raises(NeuronSetFormatError, match="no neurons.json"):
        NeuronSet.load(d)
    d = variant("notensors")
    (d / "neurons.safetensors").unlink()
    with pytest.raises(NeuronSetFormatError, match="missing"):
        NeuronSet.load(d)
    d = variant("garbage")
    (d / "neurons.safetensors").write_bytes(b"\x00" * 30)
    with pytest.raises(NeuronSetFormatError, match=f"^{d / 'neurons.safetensors'}: not a valid safetensors file: "):
        NeuronSet.load(d)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(NeuronSetFormatError, match="cannot read neuron-set JSON"):
        NeuronSet.load(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError):
        NeuronSet.load(tmp_path / "absent")


# ------------------------------------------------------------------ reference format: bad files
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_reference_refuses_arbitrary_pickles(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    torch.save([[torch.tensor([1])], _Evil(str(marker))], p)
    with pytest.raises(NeuronSetFormatError, match="refused to load.*(?i:global).*mkdir") as info:
        NeuronSet.load(p)
    assert "weights_only` set to `False`" not in str(info.value)
    p2 = tmp_path / "evil.pkl"
    p2.write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(NeuronSetFormatError):
        NeuronSet.load(p2)
    assert not marker.exists()


@pytest.mark.parametrize("obj, match", [
    ({"mt": [torch.tensor([1])]}, "expected a non-empty list"),
    ([], "expected a non-empty list .*empty"),
    ([torch.tensor([1, 2]), torch.tensor([3])], "entry 0 must be a list of per-layer tensors, got Tensor"),
    ([[torch.tensor([1])], [[1, 2]]], "entry 1 must be a list of per-layer tensors, got list containing \\['list'\\]"),
    ([[torch.tensor([1])], [torch.tensor([1]), torch.tensor([2])]], "different numbers of layers"),
    ([[torch.tensor([1.5])]], "integer dtype"),
    ([[torch.tensor([[1]])]], "1-D"),
    ([[torch.tensor([2, 2])]], "duplicate index 2"),
])
def test_reference_wrong_nesting(tmp_path, obj, match):
    p = tmp_path / "bad.pt"
    torch.save(obj, p)
    with pytest.raises(NeuronSetFormatError, match=match):
        NeuronSet.load(p)


def test_reference_not_a_torch_file(tmp_path):
    p = tmp_path / "junk.bin"
    p.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(NeuronSetFormatError, match="not a LAPE reference file"):
        NeuronSet.load(p)


def test_reference_names_and_trailing_languages(tmp_path):
    p = tmp_path / "ref"
    torch.save([[torch.tensor([1, 4]), torch.tensor([], dtype=torch.long)], [torch.tensor([0]), torch.tensor([2])]], p)
    ns = NeuronSet.load(p)
    assert ns.languages == ["lang0", "lang1"] and ns.intermediate_size is None and ns.num_layers == 2
    ns = NeuronSet.load(p, languages=["en", "mt", "cy"], intermediate_size=5, model_id="m")
    assert ns.total("cy") == 0 and ns.layer_counts("cy") == [0, 0] and ns.model_id == "m"
    assert any("absent from the reference file" in n for n in ns.notes)
    with pytest.raises(ValueError, match="2 languages, but 1 names"):
        NeuronSet.load(p, languages=["en"])
    with pytest.raises(ValueError, match="duplicate language names"):
        NeuronSet.load(p, languages=["en", "en"])
    with pytest.raises(NeuronSetFormatError, match="index 4 out of range"):
        NeuronSet.load(p, intermediate_size=4)


# ------------------------------------------------------------------ released masks
def _readme_totals():
    text = (MASKS / "README.md").read_text()
    out = {}
    for name in TOTALS:
        m = re.search(r"^\|\s*" + re.escape(name) + r"\s*\|(.*)\|\s*$", text, re.M)
        out[name] = [int(x) for x in m.group(1).split("|")]
    return out


@needs_masks
@pytest.mark.parametrize("name", sorted(TOTALS))
def test_released_masks(tmp_path, name):
    assert _readme_totals()[name] == TOTALS[name]
    L, I = SHAPES[name]
    path = MASKS / name
    ns = NeuronSet.load(path, languages=LANGS, intermediate_size=I, model_id=name)
    assert ns.languages == LANGS and ns.num_layers == L and ns.intermediate_size == I
    assert [ns.total(lang) for lang in LANGS] == TOTALS[name]
    # the released files are sorted and complete: the only note is that the reference format
    # records no model fingerprint
    assert len(ns.notes) == 1 and "no model fingerprint" in ns.notes[0], ns.notes
    ns.validate(num_layers=L, intermediate_size=I)
    raw = torch.load(path, weights_only=True)
    for k, lang in enumerate(LANGS):
        for a, b in zip(ns[lang], raw[k]):
            assert torch.equal(a, b)

    # reference format round trip: bit-identical tensors, and the same structure torch.load sees
    ref_path = ns.save(tmp_path / "ref", format="reference")
    raw2 = torch.load(ref_path, weights_only=True)
    assert isinstance(raw2, list) and len(raw2) == len(raw)
    for x, y in zip(raw, raw2):
        assert isinstance(y, list) and len(y) == len(x)
        for a, b in zip(x, y):
            assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b)
    assert ref_path.stat().st_size < 2 * path.stat().st_size  # no shared storages dragged along
    assert NeuronSet.load(ref_path, languages=LANGS, intermediate_size=I) == ns

    # our format round trip
    ns.hidden_size = 4096 if name.startswith("llama") else 5120
    ours = NeuronSet.load(ns.save(tmp_path / "ours"))
    _same(ours, ns)

    # unnamed load
    assert NeuronSet.load(path).languages == [f"lang{k}" for k in range(12)]

    # sparse-training sizes from the paper's setup: 3 * hidden * count
    assert ns.trainable_params("mt") == 3 * ns.hidden_size * TOTALS[name][0]

    # set ops against Python sets
    py = {lang: [set(t.tolist()) for t in ns[lang]] for lang in LANGS}
    for langs in (["mt", "cy"], ["is", "ne", "af"], LANGS):
        u = ns.union(langs)
        i = ns.intersection(langs)
        for layer in range(L):
            assert u[layer].tolist() == sorted(set().union(*(py[x][layer] for x in langs)))
            assert i[layer].tolist() == sorted(set.intersection(*(py[x][layer] for x in langs)))
    ov = ns.overlap()
    assert torch.equal(ov, ov.T) and ov.diag().tolist() == TOTALS[name]
    assert ov[0, 3].item() == sum(len(py["mt"][layer] & py["cy"][layer]) for layer in range(L))


@needs_masks
def test_random_like_on_released_mask():
    ns = NeuronSet.load(MASKS / "llama-3.1-5", languages=LANGS, intermediate_size=14336)
    counts = ns.layer_counts("cy")
    r = ns.random_like("cy", seed=0)
    assert [t.numel() for t in r] == counts
    for t in r:
        assert t.dtype == torch.int64 and torch.equal(t, torch.unique(t)) and (t.numel() == 0 or int(t[-1]) < 14336)
    assert all(torch.equal(a, b) for a, b in zip(r, ns.random_like("cy", seed=0)))
    assert not all(torch.equal(a, b) for a, b in zip(r, ns.random_like("cy", seed=1)))
    # overlap with the real set is what chance predicts, not the set itself
    shared = sum(int(torch.isin(a, b).sum()) for a, b in zip(r, ns["cy"]))
    expected = sum(c * c / 14336 for c in counts)
    assert shared < expected + 8 * expected ** 0.5 + 10

    t = ns.random_like("cy", seed=0, mode="total")
    assert sum(x.numel() for x in t) == 6020
    for x in t:
        assert torch.equal(x, torch.unique(x)) and (x.numel() == 0 or int(x[-1]) < 14336)
    # uniform over (layer, neuron): per-layer counts ~ Binomial-ish(6020, 1/32), not the real profile
    tc = [x.numel() for x in t]
    mean = 6020 / 32
    assert all(abs(c - mean) < 6 * mean ** 0.5 for c in tc)
    assert tc != counts
    NeuronSet({"rand": t}, 32, 14336).validate(num_layers=32, intermediate_size=14336)


# ------------------------------------------------------------------ reporting
def test_per_layer_table():
    table = per_layer_table(small_set())
    lines = table.strip().splitlines()
    assert lines[0] == "| layer | a | b | c |"
    assert lines[2] == "| 0 | 3 | 2 | 0 |"
    assert lines[3] == "| 1 | 0 | 1 | 0 |"
    assert lines[-1] == "| total | 4 | 5 | 0 |"
    assert len(lines) == 2 + 3 + 1


def test_plot_heatmap(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    out = plot_heatmap(small_set(model_id="tiny"), tmp_path / "sub" / "heat.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert matplotlib.get_backend() == backend


# ------------------------------------------------------------------ deactivate
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def _zeroing_hooks(model, per_layer):
    """Plain-PyTorch expectation: zero the neurons at down_proj's input (= act(gate) * up)."""
    handles = []
    for mlp, idx in zip((layer.mlp for layer in model.model.layers), per_layer):
        def pre(mod, args, idx=idx):
            h = args[0].clone()
            h[..., idx] = 0
            return (h,)
        handles.append(mlp.down_proj.register_forward_pre_hook(pre))
    return handles


def test_deactivate():
    import lape_kernels
    from lape_kernels import patching
    from lape_kernels.neurons import deactivate

    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits
    ns = NeuronSet({"x": [[0, 5, 23], [], [7]], "y": [[1], [2, 3], []]}, 3, 24)
    handles = _zeroing_hooks(model, ns["x"])
    with torch.no_grad():
        want = model(ids).logits
    for h in handles:
        h.remove()
    assert not torch.allclose(want, base)

    with torch.no_grad():
        with deactivate(model, (ns, "x")):  # unpatched model: patched for the duration
            assert patching.is_patched(model)
            got = model(ids).logits
        assert not patching.is_patched(model)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)

        lape_kernels.patch(model)
        with deactivate(model, ns.select("x")):
            torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
            with deactivate(model, (ns, "y")):  # nested: adds to the outer set
                assert patching.patched_mlps(model)[1]._lape.deactivated.tolist() == [2, 3]
                assert patching.patched_mlps(model)[0]._lape.deactivated.tolist() == [0, 1, 5, 23]
            assert patching.patched_mlps(model)[0]._lape.deactivated.tolist() == [0, 5, 23]
            assert patching.patched_mlps(model)[1]._lape.deactivated is None
        assert all(m._lape.deactivated is None for m in patching.patched_mlps(model))
        assert patching.is_patched(model)  # was patched before: stays patched

        with pytest.raises(RuntimeError, match="boom"):
            with deactivate(model, (ns, "x")):
                raise RuntimeError("boom")
        assert all(m._lape.deactivated is None for m in patching.patched_mlps(model))
        lape_kernels.unpatch(model)

    with pytest.raises(ValueError, match="cover 2 layers, the model has 3"):
        with deactivate(model, [torch.tensor([1]), torch.tensor([2])]):
            pass
    assert not patching.is_patched(model)
    with pytest.raises(ValueError, match="out of range"):
        with deactivate(model, [torch.tensor([24]), torch.tensor([0]), torch.tensor([0])]):
            pass
    with pytest.raises(ValueError, match="made for intermediate_size 30"):
        with deactivate(model, (NeuronSet({"x": [[1]] * 3}, 3, 30), "x")):
            pass
    with pytest.raises(TypeError, match="which language"):
        with deactivate(model, ns):
            pass
    assert not patching.is_patched(model)
