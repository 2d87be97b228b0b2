"""The shared oracles of ``lape_kernels.testing``, checked against computations that do not
use them: tests, benchmarks and examples trust these, so they must be right on their own."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lape_kernels
from lape_kernels.testing import (
    PAD_ID,
    TINY_FAMILIES,
    HookCounter,
    bake_slice_training,
    hook_counts,
    lape_count,
    random_batch,
    random_neurons,
    slice_training,
    tiny_model,
    tiny_tokenizer,
)

# ----------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_forward_backward(family):
    model = tiny_model(family, num_layers=2, intermediate=128, varied_signs=False)
    assert model.config.model_type == family
    assert model.config.hidden_size == 64 and model.config.intermediate_size == 128
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 256
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 12, 256)
    assert torch.isfinite(out.logits).all()
    # transformers' own init: a random model is near uniform over the vocabulary
    assert abs(out.loss.item() - math.log(256)) < 1.0
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_varied_signs_give_lape_like_activations(family):
    """The default init: the first layer (whose input is the embeddings' common direction) has
    neurons that fire almost always, almost never, and in between, so counts and
    identification are non-trivial."""
    model = tiny_model(family)
    assert model.config.num_hidden_layers == 3 and not model.training
    assert model.config.intermediate_size == (96 if family == "phi3" else 128)
    ids, mask = random_batch(batch=4, seq=12, seed=1)
    p = hook_counts(model, ids, mask)["over_zero"][0].double() / int(mask.sum())
    first = p[0]
    assert bool((first > 0.9).any()) and bool((first < 0.1).any()) and bool(((first > 0.3) & (first < 0.7)).any())
    assert 0.2 < float(p.mean()) < 0.8


@pytest.mark.parametrize("varied_signs", [True, False])
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3"])
def test_tiny_model_deterministic_and_rng_neutral(family, varied_signs):
    state = torch.random.get_rng_state()
    a, b = tiny_model(family, seed=3, varied_signs=varied_signs), tiny_model(family, seed=3, varied_signs=varied_signs)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = tiny_model(family, seed=4, varied_signs=varied_signs)
    assert any(not torch.equal(sa[k], c.state_dict()[k]) for k in sa)


def test_tiny_model_overrides_and_errors():
    m = tiny_model("qwen3", num_hidden_layers=4, intermediate_size=80)  # config fields win
    assert m.config.num_hidden_layers == 4
    assert m.model.layers[0].mlp.gate_proj.weight.shape == (80, 64)
    assert tiny_model("phi3", intermediate=128).model.layers[0].mlp.gate_up_proj.weight.shape == (256, 64)
    assert tiny_model("gemma", dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16
    assert tiny_model("gemma2").config.sliding_window == 8  # shorter than the test sequences
    with pytest.raises(ValueError, match="family must be one of"):
        tiny_model("gpt2")


def test_tiny_tokenizer_roundtrip():
    tok = tiny_tokenizer()
    ids = tok("Hi there!")["input_ids"]
    assert ids[0] == tok.bos_token_id == 1
    assert len(ids) == 1 + len("Hi there!")
    assert tok.decode(ids, skip_special_tokens=True) == "Hi there!"
    assert tok("é", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 2)
    assert max(tok.get_vocab().values()) < 256
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_tokenizer(50)


@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_random_batch_padding(padding):
    ids, mask = random_batch(batch=4, seq=9, seed=5, padding=padding)
    assert ids.shape == mask.shape == (4, 9) and bool((mask[0] == 1).all())
    assert torch.equal(ids == PAD_ID, mask == 0)  # pad positions hold PAD_ID, real tokens never do
    lengths = mask.sum(1)
    if padding is None:
        assert bool((lengths == 9).all())
    else:
        assert bool((lengths[1:] < 9).all()) and bool((lengths > 0).all())
        edge = 0 if padding == "left" else -1
        assert bool((mask[1:, edge] == 0).all())  # padding sits at the named end
        assert bool((mask[:, 8 if padding == "left" else 0] == 1).all())
    with pytest.raises(ValueError, match="padding must be"):
        random_batch(padding="middle")


def test_random_neurons():
    per_layer = random_neurons(3, 20, (4, 0, 7), seed=2)
    assert [t.numel() for t in per_layer] == [4, 0, 7]
    for t in per_layer:
        assert t.dtype == torch.int64 and torch.equal(t, torch.unique(t)) and (t.numel() == 0 or int(t.max()) < 20)
    assert all(torch.equal(a, b) for a, b in zip(per_layer, random_neurons(3, 20, (4, 0, 7), seed=2)))
    assert [t.numel() for t in random_neurons(2, 20, 5)] == [5, 5]
    with pytest.raises(ValueError, match="k lists 2 layers, expected 3"):
        random_neurons(3, 20, (1, 2))


# ----------------------------------------------------------------------------- LAPE counting


@settings(max_examples=40, deadline=None)
@given(T=st.integers(0, 12), I=st.integers(1, 6), K=st.integers(1, 3), seed=st.integers(0, 999))
def test_lape_count_is_a_per_language_count(T, I, K, seed):
    g = torch.Generator().manual_seed(seed)
    act = torch.randn(T, I, generator=g)
    lang = torch.randint(-1, K, (T,), generator=g)
    over_zero, act_sum = lape_count(act, lang, K)
    for k in range(K):
        for i in range(I):
            rows = [t for t in range(T) if int(lang[t]) == k]
            assert int(over_zero[k, i]) == sum(1 for t in rows if float(act[t, i]) > 0)
            assert math.isclose(float(act_sum[k, i]), sum(float(act[t, i]) for t in rows), abs_tol=1e-9)
    all_zero, _ = lape_count(act, None, K)
    assert torch.equal(all_zero[0], (act > 0).sum(0)) and int(all_zero[1:].abs().sum()) == 0
    assert lape_count(act, lang, K, with_sum=False)[1] is None


def _gate_capture_counts(model, ids, mask):
    """Independent of the activation-module hooks: capture each layer's gate projection output
    and apply the activation function by its name."""
    act_fn = {"silu": F.silu, "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh")}[
        getattr(model.config, "hidden_activation", None) or model.config.hidden_act]
    gates = []
    hooks = []
    for layer in model.model.layers:
        mlp = layer.mlp
        if hasattr(mlp, "gate_up_proj"):
            hooks.append(mlp.gate_up_proj.register_forward_hook(lambda m, i, o: gates.append(o.chunk(2, -1)[0])))
        else:
            hooks.append(mlp.gate_proj.register_forward_hook(lambda m, i, o: gates.append(o)))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    valid = mask.bool()
    acts = [act_fn(g)[valid] for g in gates]  # [tokens, I] per layer, padding dropped
    return torch.stack([(a > 0).sum(0) for a in acts]), torch.stack([a.double().sum(0) for a in acts])


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3"])
def test_hook_counts_equal_counts_from_captured_gates(family):
    model = tiny_model(family)
    ids, mask = random_batch(batch=3, seq=10, seed=3, padding="left")
    ref = hook_counts(model, ids, mask)
    over_zero, act_sum = _gate_capture_counts(model, ids, mask)
    assert torch.equal(ref["over_zero"][0], over_zero) and int(ref["n_tokens"][0]) == int(mask.sum())
    torch.testing.assert_close(ref["act_sum"][0], act_sum, rtol=1e-6, atol=1e-5)


def test_hook_counts_per_language_and_patched_input():
    """Languages split the same counts; a patched model is counted on an unpatched copy."""
    model = tiny_model("qwen2")
    ids, mask = random_batch(batch=3, seq=8, seed=4, padding="right")
    one = hook_counts(model, ids, mask)
    lang = torch.tensor([1, 0, 1])
    two = hook_counts(lape_kernels.patch(copy.deepcopy(model)), ids, mask, token_lang=lang, num_langs=2)
    assert torch.equal(two["over_zero"].sum(0), one["over_zero"][0])
    assert two["n_tokens"].tolist() == [int(mask[1].sum()), int(mask[0].sum() + mask[2].sum())]


def test_hook_counter_accumulates_and_removes_its_hooks():
    model = tiny_model("llama")
    ids, mask = random_batch(batch=2, seq=6, seed=6)
    with HookCounter(model, with_sum=False) as counter:
        with torch.no_grad():
            model(input_ids=ids)
            model(input_ids=ids)
        assert counter.act_sum is None and int(counter.n_tokens[0]) == 2 * ids.numel()
    assert torch.equal(counter.over_zero, 2 * hook_counts(model, ids, mask)["over_zero"])
    assert not any(m._forward_hooks for m in model.modules())


# ----------------------------------------------------------------------------- slice training


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_slice_training_grads_are_the_dense_grads_of_the_slices(family):
    """Against ordinary dense autograd on the unmodified model: each slice's gradient is the
    selected rows (columns) of the full weight's gradient."""
    model = tiny_model(family, num_layers=2)
    neurons = random_neurons(2, model.config.intermediate_size, (5, 0), seed=1)
    ids, _ = random_batch(batch=2, seq=7, seed=2)
    dense = copy.deepcopy(model)
    dense(input_ids=ids, labels=ids).loss.backward()
    sliced = copy.deepcopy(model)
    params = slice_training(sliced, neurons)
    assert [p.requires_grad for p in sliced.parameters()].count(True) == len(params) == 3
    loss = sliced(input_ids=ids, labels=ids).loss
    loss.backward()
    mlp, sel = dense.model.layers[0].mlp, neurons[0]
    if family == "phi3":
        g = mlp.gate_up_proj.weight.grad
        want = [g[sel], g[sel + g.shape[0] // 2], mlp.down_proj.weight.grad[:, sel]]
    else:
        want = [mlp.gate_proj.weight.grad[sel], mlp.up_proj.weight.grad[sel], mlp.down_proj.weight.grad[:, sel]]
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=1e-8)
    # baking writes the slices into the weights and leaves plain Linear weights
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    bake_slice_training(sliced)
    w = sliced.model.layers[0].mlp.down_proj.weight
    assert isinstance(w, torch.nn.Parameter)
    torch.testing.assert_close(w[:, sel], model.model.layers[0].mlp.down_proj.weight[:, sel] + 1.0)
    with pytest.raises(ValueError, match="unpatch"):
        slice_training(lape_kernels.patch(copy.deepcopy(model)), neurons)
