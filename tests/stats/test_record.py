"""``record``: LAPE counts from the fused kernel must equal, bit for bit, what the LAPE reference's
hook approach counts on an unpatched model; languages, padding, shards and files must be exact."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lape_kernels
from lape_kernels import introspection, patching
from lape_kernels.stats import ActivationStats, StatsByLanguage, record

from lape_kernels.testing import TINY_FAMILIES as FAMILIES
from lape_kernels.testing import hook_counts, random_batch, tiny_gemma3_multimodal, tiny_model

from helpers import MODEL_DTYPES, over_families_dtypes_paddings


def _record(model, ids, mask, languages=None, lang_ids=None, **kw):
    with torch.no_grad(), record(model, languages) as stats:
        if lang_ids is not None:
            stats.set_batch_languages(lang_ids)
        model(input_ids=ids, attention_mask=mask, **kw)
    return stats


def _assert_matches(stats: ActivationStats, ref: dict, k: int = 0) -> None:
    assert stats.over_zero.dtype == torch.int64 and stats.act_sum.dtype == torch.float64
    assert torch.equal(stats.over_zero, ref["over_zero"][k])
    assert stats.n_tokens == int(ref["n_tokens"][k])
    torch.testing.assert_close(stats.act_sum, ref["act_sum"][k], rtol=1e-5, atol=1e-4)


@over_families_dtypes_paddings([None, "left", "right"])
def test_counts_match_hook_reference(family, dtype, padding):
    model = tiny_model(family, dtype=MODEL_DTYPES[dtype])
    ids, mask = random_batch(batch=4, seq=12, seed=1, padding=padding)
    ref = hook_counts(model, ids, mask)
    stats = _record(model, ids, mask)
    _assert_matches(stats, ref)
    assert stats.n_tokens == int(mask.sum())
    assert stats.over_zero.device.type == "cpu" and not stats.recording
    assert not patching.is_patched(model)  # record patched it, so record unpatched it
    p = stats.activation_probability()
    assert 0 < float(p.mean()) < 1 and bool((p > 0.9).any()) and bool((p < 0.1).any())  # non-trivial counts
    assert stats.meta["model_type"] == model.config.model_type and stats.meta["num_layers"] == 3
    assert stats.meta["dtype"] == str(MODEL_DTYPES[dtype]).replace("torch.", "")


def test_no_mask_counts_every_token_and_inputs_embeds():
    model = tiny_model("qwen2")
    ids, _ = random_batch(batch=2, seq=9, seed=3)
    ref = hook_counts(model, ids, None)
    a = _record(model, ids, None)
    _assert_matches(a, ref)
    assert a.n_tokens == 18
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad(), record(model) as b:
        model(inputs_embeds=embeds)
    assert a.equal(b)


def test_positional_mask_on_decoder_body():
    model = tiny_model("llama")
    ids, mask = random_batch(batch=3, seq=10, seed=4, padding="right")
    ref = hook_counts(model, ids, mask)
    body = introspection.decoder_body(model)
    with torch.no_grad(), record(model) as stats:
        body(ids, mask)  # attention_mask as positional argument 1
    _assert_matches(stats, ref)


# ----------------------------------------------------------------------------- languages


def test_mixed_batch_per_sequence_equals_separate_passes():
    model = tiny_model("gemma2")
    ids, mask = random_batch(batch=5, seq=11, seed=5, padding="left")
    seq_lang = [0, 1, 0, -1, 2]
    mixed = _record(model, ids, mask, ["en", "mt", "xx"], seq_lang)
    assert isinstance(mixed, StatsByLanguage) and list(mixed) == ["en", "mt", "xx"]
    for k, lang in enumerate(["en", "mt", "xx"]):
        rows = [b for b, l in enumerate(seq_lang) if l == k]
        alone = _record(model, ids[rows], mask[rows])  # the same sequences, in a batch of their own
        assert torch.equal(mixed[lang].over_zero, alone.over_zero) and mixed[lang].n_tokens == alone.n_tokens
        torch.testing.assert_close(mixed[lang].act_sum, alone.act_sum, rtol=1e-6, atol=1e-6)
        assert mixed[lang].meta["language"] == lang
    ref = hook_counts(model, ids, mask, token_lang=torch.tensor(seq_lang), num_langs=3)
    for k, lang in enumerate(["en", "mt", "xx"]):
        _assert_matches(mixed[lang], ref, k)


@pytest.mark.parametrize("dtype", list(MODEL_DTYPES))
def test_mixed_batch_per_token_ids(dtype):
    model = tiny_model("phi3", dtype=MODEL_DTYPES[dtype])
    ids, mask = random_batch(batch=3, seq=10, seed=6, padding="right")
    tok_lang = torch.randint(-1, 2, (3, 10), generator=torch.Generator().manual_seed(0))
    mixed = _record(model, ids, mask, ["a", "b"], tok_lang)
    ref = hook_counts(model, ids, mask, token_lang=tok_lang, num_langs=2)
    _assert_matches(mixed["a"], ref, 0)
    _assert_matches(mixed["b"], ref, 1)
    # names work as ids too, and per-language stats add up to the single-language pass
    names = [["a" if v == 0 else "b" for v in row] for row in tok_lang.tolist()]
    by_name = _record(model, ids, mask, ["a", "b"], names)
    whole = _record(model, ids, mask)
    total = by_name["a"] + by_name["b"]
    assert torch.equal(total.over_zero, whole.over_zero) and total.n_tokens == whole.n_tokens


def test_single_language_list_needs_no_ids_and_str_language():
    model = tiny_model("qwen3")
    ids, mask = random_batch(seed=7, padding="left")
    one = _record(model, ids, mask, ["mt"])
    plain = _record(model, ids, mask, "mt")
    assert isinstance(plain, ActivationStats) and plain.meta["language"] == "mt"
    assert one["mt"].equal(plain)


def test_skip_all_sequences_counts_nothing():
    model = tiny_model("llama")
    ids, mask = random_batch(seed=8)
    s = _record(model, ids, mask, ["a", "b"], [-1, -1, -1])
    assert s["a"].n_tokens == 0 and int(s["a"].over_zero.sum()) == 0 and float(s["b"].act_sum.abs().sum()) == 0.0


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_random_language_assignments(data):
    """Any mix of per-sequence/per-token ids and padding equals the hook reference exactly."""
    model = _hyp_model()
    B = data.draw(st.integers(1, 4))
    S = data.draw(st.integers(1, 8))
    seed = data.draw(st.integers(0, 1000))
    padding = data.draw(st.sampled_from([None, "left", "right"])) if S > 1 else None
    ids, mask = random_batch(batch=B, seq=S, seed=seed, padding=padding)
    per_token = data.draw(st.booleans())
    shape = (B, S) if per_token else (B,)
    n = B * S if per_token else B
    lang = torch.tensor(data.draw(st.lists(st.integers(-1, 2), min_size=n, max_size=n))).reshape(shape)
    stats = _record(model, ids, mask, ["x", "y", "z"], lang)
    ref = hook_counts(model, ids, mask, token_lang=lang, num_langs=3)
    for k, l in enumerate(["x", "y", "z"]):
        _assert_matches(stats[l], ref, k)


_HYP_MODEL = {}


def _hyp_model():
    if "m" not in _HYP_MODEL:
        _HYP_MODEL["m"] = tiny_model("gemma", num_layers=2)
    return _HYP_MODEL["m"]


# ----------------------------------------------------------------------------- generation, autograd


def test_generate_with_kv_cache_counts_new_tokens():
    """With a KV cache the MLP sees only the new tokens while the mask grows: counts must equal
    one cache-free forward over everything generate fed to the model."""
    model = tiny_model("llama")
    ids, mask = random_batch(batch=3, seq=8, seed=9, padding="left")
    new = 5
    with torch.no_grad(), record(model) as stats:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    assert stats.n_tokens == int(mask.sum()) + 3 * (new - 1)
    fed = out[:, :-1]
    fed_mask = torch.cat([mask, torch.ones(3, new - 1, dtype=mask.dtype)], dim=1)
    ref = hook_counts(model, fed, fed_mask)
    assert stats.n_tokens == int(ref["n_tokens"][0])
    assert int((stats.over_zero - ref["over_zero"][0]).abs().sum()) <= 2  # cached attention: last-bit differences
    torch.testing.assert_close(stats.act_sum, ref["act_sum"][0], rtol=1e-4, atol=1e-3)


def test_generate_per_sequence_languages():
    model = tiny_model("qwen2")
    ids, mask = random_batch(batch=2, seq=6, seed=10, padding="left")
    with torch.no_grad(), record(model, ["a", "b"]) as stats:
        stats.set_batch_languages(["b", "a"])
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3,
                       do_sample=False, pad_token_id=0, eos_token_id=None)
    assert stats["a"].n_tokens == int(mask[1].sum()) + 2
    assert stats["b"].n_tokens == int(mask[0].sum()) + 2


def test_record_keeps_autograd_and_checkpointing_counts_once():
    model = tiny_model("mistral")
    ids, mask = random_batch(batch=2, seq=8, seed=11, padding="right")
    ref_model = copy.deepcopy(model)
    ref_model(input_ids=ids, attention_mask=mask).logits.float().pow(2).mean().backward()
    expected = _record(model, ids, mask)

    model.train()
    model.activation_checkpointing_enable()
    with record(model) as stats:
        loss = model(input_ids=ids, attention_mask=mask).logits.float().pow(2).mean()
        loss.backward()  # checkpointing re-runs every layer's forward here: must not count again
    assert torch.equal(stats.over_zero, expected.over_zero) and stats.n_tokens == expected.n_tokens
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_inference_mode_and_live_reading():
    model = tiny_model("gemma3_text")
    ids, mask = random_batch(batch=2, seq=7, seed=12, padding="left")
    with record(model) as stats:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)
        first = stats.n_tokens  # read while recording
        oz1 = stats.over_zero
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    assert first == int(mask.sum()) and stats.n_tokens == 2 * first
    assert torch.equal(stats.over_zero, 2 * oz1)
    assert not stats.over_zero.is_inference()
    stats.over_zero.add_(0)  # usable as a normal tensor


def test_recording_a_patched_model_leaves_it_patched_and_cleans_up_on_error():
    model = lape_kernels.patch(tiny_model("llama"))
    ids, mask = random_batch(seed=13)
    body = introspection.decoder_body(model)
    # the patch's own hooks (they tell the active recorder where forwards start): a block
    # registers nothing of its own, so that torch.compile's guards on hook ids keep holding
    hooks = (dict(body._forward_pre_hooks), dict(body._forward_hooks), dict(model._forward_pre_hooks))
    with pytest.raises(KeyboardInterrupt):
        with record(model):
            raise KeyboardInterrupt
    assert patching.is_patched(model)
    assert all(m._lape.recorder is None for m in patching.patched_mlps(model))
    assert model._lape_model.recorder is None and not patching.is_recording(model)
    assert (dict(body._forward_pre_hooks), dict(body._forward_hooks), dict(model._forward_pre_hooks)) == hooks
    a = _record(model, ids, mask)
    assert patching.is_patched(model)
    lape_kernels.unpatch(model)
    assert not body._forward_pre_hooks and not body._forward_hooks and not model._forward_pre_hooks
    assert not model._forward_hooks and "_lape_model" not in model.__dict__
    assert a.equal(_record(model, ids, mask))


def test_two_forwards_accumulate_and_add_of_shards_equals_one_pass():
    model = tiny_model("qwen3")
    ids_a, mask_a = random_batch(batch=2, seq=9, seed=14, padding="left")
    ids_b, mask_b = random_batch(batch=3, seq=9, seed=15, padding="right")
    a = _record(model, ids_a, mask_a)
    b = _record(model, ids_b, mask_b)
    with torch.no_grad(), record(model) as both:
        model(input_ids=ids_a, attention_mask=mask_a)
        model(input_ids=ids_b, attention_mask=mask_b)
    assert (a + b).equal(both) and sum([a, b]).equal(both) and ActivationStats.sum([a, b]).equal(both)
    one_batch = _record(model, torch.cat([ids_a, ids_b]), torch.cat([mask_a, mask_b]))
    assert torch.equal(one_batch.over_zero, both.over_zero) and one_batch.n_tokens == both.n_tokens
    torch.testing.assert_close(one_batch.act_sum, both.act_sum, rtol=1e-9, atol=1e-5)


# ----------------------------------------------------------------------------- stats object, files


def _random_stats(L=3, I=5, n=40, seed=0, meta=None):
    g = torch.Generator().manual_seed(seed)
    oz = torch.randint(0, n + 1, (L, I), generator=g)
    return ActivationStats(oz, torch.randn(L, I, generator=g, dtype=torch.float64), n, meta or {"language": "mt"})


def test_save_load_round_trip_is_exact_and_pickle_free(tmp_path):
    from safetensors import safe_open

    s = _random_stats(meta={"language": "mt", "model": "tiny/x", "nested": {"a": [1, 2]}})
    path = tmp_path / "sub" / "mt.safetensors"
    s.save(path)
    t = ActivationStats.load(path)
    assert t.equal(s) and t.meta == s.meta and t.over_zero.dtype == torch.int64 and t.act_sum.dtype == torch.float64
    with safe_open(str(path), framework="pt") as f:  # plain safetensors: tensors + JSON metadata
        assert set(f.keys()) == {"over_zero", "act_sum"}
        assert json.loads(f.metadata()["meta"])["model"] == "tiny/x" and f.metadata()["n_tokens"] == "40"
    no_sum = ActivationStats.from_lape_dict(s.to_lape_dict())
    no_sum.save(tmp_path / "ns.safetensors")
    back = ActivationStats.load(tmp_path / "ns.safetensors")
    assert back.act_sum is None and back.equal(no_sum)


def test_stats_by_language_save_load(tmp_path):
    model = tiny_model("gemma")
    ids, mask = random_batch(batch=4, seq=6, seed=16, padding="left")
    langs = ["en", "pt-BR", "zh/Hans"]  # a name that is not a safe file name
    s = _record(model, ids, mask, langs, [0, 1, 2, 0])
    s.save(tmp_path / "stats")
    t = StatsByLanguage.load(tmp_path / "stats")
    assert t.languages == langs and all(t[l].equal(s[l]) and t[l].meta == s[l].meta for l in langs)
    assert (tmp_path / "stats" / "en.safetensors").is_file() and (tmp_path / "stats" / "pt-BR.safetensors").is_file()
    u = t + t
    assert u["en"].n_tokens == 2 * s["en"].n_tokens
    with pytest.raises(FileNotFoundError, match="index.json"):
        StatsByLanguage.load(tmp_path)
    with pytest.raises(RuntimeError, match="only works inside"):
        t.set_batch_languages([0, 1, 2, 0])


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"over_zero": torch.zeros(2, 2, dtype=torch.int64)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not an ActivationStats file"):
        ActivationStats.load(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError):
        ActivationStats.load(tmp_path / "missing.safetensors")


def test_lape_dict_format_and_derived_quantities():
    s = _random_stats()
    d = s.to_lape_dict()
    assert set(d) == {"n", "over_zero"} and type(d["n"]) is int and d["n"] == 40
    assert d["over_zero"].dtype == torch.int64 and d["over_zero"].shape == (3, 5)
    assert torch.equal(d["over_zero"], s.over_zero) and d["over_zero"] is not s.over_zero
    back = ActivationStats.from_lape_dict({"n": torch.tensor(40), "over_zero": d["over_zero"].int()})
    assert back.over_zero.dtype == torch.int64 and torch.equal(back.over_zero, s.over_zero) and back.act_sum is None
    p = s.activation_probability()
    assert p.dtype == torch.float32 and torch.equal(p, (s.over_zero.double() / 40).float())
    torch.testing.assert_close(s.mean_activation(), (s.act_sum / 40).float())
    with pytest.raises(ValueError, match="no act_sum"):
        back.mean_activation()
    with pytest.raises(ValueError, match="no tokens"):
        ActivationStats(torch.zeros(1, 2, dtype=torch.int64), None, 0).activation_probability()


def test_add_mismatched_shards_errors():
    a = _random_stats(L=3, I=5)
    with pytest.raises(ValueError, match="different layer counts.*\\[3, 5\\] vs \\[2, 5\\]"):
        a + _random_stats(L=2, I=5)
    with pytest.raises(ValueError, match="different intermediate sizes"):
        a + _random_stats(L=3, I=6)
    with pytest.raises(TypeError, match="can only add ActivationStats"):
        a + {"n": 1}
    with pytest.raises(ValueError, match="at least one"):
        ActivationStats.sum([])
    c = a + _random_stats(seed=1, meta={"language": "en"})
    assert "language" not in c.meta  # conflicting meta is dropped, not guessed
    half = ActivationStats.from_lape_dict(a.to_lape_dict())
    assert (a + half).act_sum is None and (a + half).n_tokens == 80


@settings(max_examples=40, deadline=None)
@given(L=st.integers(1, 4), I=st.integers(1, 7), n1=st.integers(0, 50), n2=st.integers(0, 50), seed=st.integers(0, 99))
def test_property_add_is_exact_and_commutative(L, I, n1, n2, seed):
    a, b = _random_stats(L, I, n1, seed), _random_stats(L, I, n2, seed + 1)
    c = a + b
    assert c.equal(b + a) and c.n_tokens == n1 + n2
    assert torch.equal(c.over_zero, a.over_zero + b.over_zero)
    assert ActivationStats.from_lape_dict(c.to_lape_dict()).to_lape_dict()["n"] == n1 + n2


@pytest.mark.parametrize("args, exc, match", [
    ((torch.zeros(2, 3), None, 1), TypeError, "integer tensor"),
    ((torch.zeros(2, 3, 1, dtype=torch.int64), None, 1), ValueError, "2-D"),
    ((torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 4), 1), ValueError, "does not match"),
    ((torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64), 1), TypeError, "floating-point"),
    ((torch.zeros(2, 3, dtype=torch.int64), None, -1), ValueError, ">= 0"),
    ((torch.zeros(2, 3, dtype=torch.int64), None, 2.0), TypeError, "int"),
    ((torch.full((2, 3), 5), None, 4), ValueError, "n_tokens=4"),
    (([[1]], None, 1), TypeError, "torch.Tensor"),
])
def test_activation_stats_bad_construction(args, exc, match):
    with pytest.raises(exc, match=match):
        ActivationStats(*args)


def test_from_lape_dict_bad_input():
    with pytest.raises(ValueError, match="'n' and 'over_zero'"):
        ActivationStats.from_lape_dict({"over_zero": torch.zeros(1, 1, dtype=torch.int64)})
    with pytest.raises(TypeError, match="JSON"):
        ActivationStats(torch.zeros(1, 1, dtype=torch.int64), None, 0, {"x": object()}).save("/tmp/never_written.st")


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("ids, exc, match", [
    ([0, 3, 1], ValueError, "language id 3 out of range.*-1 = skip"),
    ([0, -2, 1], ValueError, "language id -2 out of range"),
    (["en", "xx", "en"], ValueError, "unknown language 'xx'"),
    (torch.tensor([0.0, 1.0, 1.0]), TypeError, "integer tensor"),
    (torch.zeros(3, 2, 2, dtype=torch.int64), ValueError, r"\[batch\].*\[batch, seq\]"),
    ([[0, 1], [1]], ValueError, "rectangular"),
    ([0.5, 1, 1], TypeError, "ints or language names"),
    ("en", TypeError, "tensor or a list"),
])
def test_set_batch_languages_bad_ids(ids, exc, match):
    model = tiny_model("llama", num_layers=2)
    with record(model, ["en", "mt", "de"]) as stats:
        with pytest.raises(exc, match=match):
            stats.set_batch_languages(ids)


@pytest.mark.parametrize("lang_ids, match", [
    ([0, 1], "got 2 sequences but the forward has batch size 3"),
    (torch.zeros(3, 4, dtype=torch.int64), "4 columns but the forward has 10 tokens"),
    (None, "call stats.set_batch_languages"),
])
def test_language_ids_that_do_not_fit_the_batch(lang_ids, match):
    model = tiny_model("llama", num_layers=2)
    ids, mask = random_batch(batch=3, seq=10)
    with pytest.raises((ValueError, RuntimeError), match=match):
        _record(model, ids, mask, ["en", "mt"], lang_ids)
    assert not patching.is_patched(model)


def test_bad_record_arguments_and_masks():
    model = tiny_model("llama", num_layers=2)
    ids, mask = random_batch(batch=2, seq=5)
    for bad, exc, match in [([], ValueError, "empty"), (["a", "a"], ValueError, "duplicate"),
                            ([1, 2], TypeError, "non-empty strings"), (3, TypeError, "list of language names")]:
        with pytest.raises(exc, match=match):
            with record(model, bad):
                pass
    with pytest.raises(TypeError, match="nn.Module"):
        with record("model"):
            pass
    with pytest.raises(ValueError, match="2-D \\[batch, seq\\] attention_mask"):
        _record(model, ids, torch.ones(2, 1, 5, 5))
    with pytest.raises(ValueError, match="does not cover"):
        _record(model, ids, torch.ones(2, 3, dtype=torch.int64))
    assert not patching.is_patched(model)


def test_nested_record_and_mlp_outside_body():
    model = tiny_model("llama", num_layers=2)
    with record(model):
        with pytest.raises(RuntimeError, match="already being recorded"):
            with record(model):
                pass
        mlp = model.model.layers[0].mlp
        with pytest.raises(RuntimeError, match="outside a forward of the decoder body"):
            mlp(torch.randn(1, 3, 64))
    assert not patching.is_patched(model)


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_torch_compile_with_record():
    """record works under torch.compile(model) (inductor: slow to compile on CPU)."""
    model = lape_kernels.patch(tiny_model("llama"), chunked_loss=False)
    ids, mask = random_batch(batch=3, seq=10, seed=17, padding="left")
    ref = hook_counts(model, ids, mask)
    compiled = torch.compile(model)
    with torch.no_grad(), record(model) as stats:
        a = compiled(input_ids=ids, attention_mask=mask).logits
        compiled(input_ids=ids, attention_mask=mask)
    assert torch.equal(stats.over_zero, 2 * ref["over_zero"][0]) and stats.n_tokens == 2 * int(mask.sum())
    lape_kernels.unpatch(model)
    torch.testing.assert_close(a, model(input_ids=ids, attention_mask=mask).logits, rtol=1e-4, atol=1e-4)


def test_torch_compile_aot_eager_with_record():
    """Dynamo tracing of the patched forward + recorder (fake-tensor kernels, no codegen)."""
    model = lape_kernels.patch(tiny_model("qwen2", num_layers=2), chunked_loss=False)
    ids, mask = random_batch(batch=2, seq=6, seed=18, padding="right")
    ref = hook_counts(model, ids, mask)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad(), record(model) as stats:
        compiled(input_ids=ids, attention_mask=mask)
    assert torch.equal(stats.over_zero, ref["over_zero"][0]) and stats.n_tokens == int(mask.sum())


def test_multimodal_gemma3_uses_the_outer_2d_mask():
    """Gemma3ForConditionalGeneration passes its language model a dict of 4-D masks: padding is
    taken from the 2-D mask the wrapper received."""
    model = tiny_gemma3_multimodal()
    ids, mask = random_batch(batch=3, seq=10, seed=19, padding="left")
    assert introspection.decoder_body(model) is model.model.language_model
    ref = hook_counts(model, ids, mask)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad(), record(model) as stats:
        got = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(stats.over_zero, ref["over_zero"][0]) and stats.n_tokens == int(mask.sum())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- fused_gemm=True


def _calls_of_fused_op(monkeypatch):
    from lape_kernels.kernels import ops

    calls = []
    real = ops.gate_up_act_mul_count
    monkeypatch.setattr(ops, "gate_up_act_mul_count", lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


@pytest.mark.parametrize("dtype", list(MODEL_DTYPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_gemm_record_equals_standard_record(family, dtype, monkeypatch):
    """On CPU the fused op runs the module's own GEMMs (gate/up rounded to the dtype where
    nn.Linear rounds them): identical counts, sums and logits in every dtype."""
    model = tiny_model(family, dtype=MODEL_DTYPES[dtype])
    ids, mask = random_batch(padding="left")
    calls = _calls_of_fused_op(monkeypatch)
    runs = {}
    for fused in (False, True):
        with torch.no_grad(), record(model, fused_gemm=fused) as stats:
            logits = model(input_ids=ids, attention_mask=mask).logits
        runs[fused] = (stats, logits)
    assert len(calls) == model.config.num_hidden_layers  # only the fused run took the fused path
    (a, la), (b, lb) = runs[False], runs[True]
    assert torch.equal(a.over_zero, b.over_zero) and a.n_tokens == b.n_tokens
    assert torch.equal(b.act_sum, a.act_sum) and torch.equal(lb, la)


def test_fused_gemm_falls_back_where_it_does_not_apply(monkeypatch):
    """Forwards that need gradients, autocast and MLP biases take the standard path."""
    calls = _calls_of_fused_op(monkeypatch)
    model = tiny_model("llama")
    ids, mask = random_batch()
    with record(model, fused_gemm=True) as stats:
        model.model.embed_tokens.weight.requires_grad_(True)
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()  # grads through the MLPs
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    assert calls == [] and stats.n_tokens == 2 * int(mask.sum())
    biased = tiny_model("llama")
    biased.config.mlp_bias = True
    for layer in biased.model.layers:
        for name in ("gate_proj", "up_proj"):
            lin = getattr(layer.mlp, name)
            lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features))
    with torch.no_grad(), record(biased, fused_gemm=True):
        biased(input_ids=ids, attention_mask=mask)
    assert calls == []
