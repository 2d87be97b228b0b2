"""Instance patching: the patched model computes what the original computes, ``unpatch`` gives
back exactly the original, and nothing leaks between instances or into the classes."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lape_kernels
from lape_kernels import introspection, patching
from lape_kernels import UnsupportedModelError, patch, unpatch

from lape_kernels.testing import TINY_FAMILIES as FAMILIES
from lape_kernels.testing import random_batch, tiny_gemma3_multimodal, tiny_model

from helpers import MODEL_DTYPES, over_families_dtypes_paddings


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def _assert_unpatched(model):
    assert not patching.is_patched(model) and not hasattr(model, "_lape_patched")
    for layer in model.model.layers:
        mlp = layer.mlp
        assert "forward" not in mlp.__dict__ and not hasattr(mlp, "_lape")
        assert mlp.forward.__func__ is type(mlp).forward


@over_families_dtypes_paddings([None, "left"])
def test_patched_logits_match_original(family, dtype, padding):
    model = tiny_model(family, dtype=MODEL_DTYPES[dtype])
    ids, mask = random_batch(batch=3, seq=12, seed=2, padding=padding)
    expected = _logits(model, ids, mask)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert patch(model) is model
    assert patching.is_patched(model) and lape_kernels.is_patched(model)
    assert torch.equal(_logits(model, ids, mask), expected)  # the ops compute what HF computes
    # weights and state_dict untouched; the state is plain Python, not in the state_dict
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    mlps = patching.patched_mlps(model)
    assert [m._lape.layer_index for m in mlps] == list(range(3))
    assert all(m._lape.recorder is None and m._lape.deactivated is None and m._lape.sparse is None for m in mlps)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_is_bit_identical_to_never_patched(family):
    never = tiny_model(family)
    model = tiny_model(family)
    ids, mask = random_batch(batch=2, seq=9, seed=3, padding="left")
    patch(model)
    patch(model)  # twice: harmless
    _logits(model, ids, mask)
    assert unpatch(model) is model
    _assert_unpatched(model)
    assert torch.equal(_logits(model, ids, mask), _logits(never, ids, mask))
    assert unpatch(model) is model  # unpatching an unpatched model is a no-op
    assert all(p.requires_grad for p in model.parameters())


def test_patch_twice_keeps_one_state_per_mlp():
    model = tiny_model("llama")
    ids, mask = random_batch(seed=4)
    patch(model)
    states = [m._lape for m in patching.patched_mlps(model)]
    forwards = [m.__dict__["forward"] for m in patching.patched_mlps(model)]
    once = _logits(model, ids, mask)
    patch(model)
    assert [m._lape for m in patching.patched_mlps(model)] == states
    assert all(a is b for a, b in zip(states, [m._lape for m in patching.patched_mlps(model)]))
    assert all(a is m.__dict__["forward"] for a, m in zip(forwards, patching.patched_mlps(model)))
    assert torch.equal(_logits(model, ids, mask), once)


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2"])
def test_patching_one_instance_leaves_others_and_the_class_alone(family):
    a, b = tiny_model(family), tiny_model(family)
    cls = type(a.model.layers[0].mlp)
    class_forward = cls.forward
    ids, mask = random_batch(seed=5, padding="right")
    before = _logits(b, ids, mask)
    patch(a)
    assert cls.forward is class_forward
    _assert_unpatched(b)
    assert torch.equal(_logits(b, ids, mask), before)
    fresh = tiny_model(family)
    _assert_unpatched(fresh)


def test_unsupported_models_say_why_and_how_to_check():
    import transformers as tf

    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    for bad, why in ((gpt2, "has no gated MLP"), (nn.Linear(4, 4), "has no decoder layers")):
        with pytest.raises(UnsupportedModelError) as err:
            patch(bad)
        msg = str(err.value)
        assert why in msg and "lape_kernels.check_model(model)" in msg and "supported_model_types()" in msg
        with pytest.raises(UnsupportedModelError, match=why):
            lape_kernels.check_model(bad)
    assert isinstance(UnsupportedModelError("x"), ValueError)
    assert "gpt2" in str(pytest.raises(UnsupportedModelError, patch, gpt2).value)
    assert not hasattr(gpt2, "_lape_patched")
    with pytest.raises(TypeError, match="nn.Module"):
        patch("not a model")
    assert set(lape_kernels.supported_model_types()) >= {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                                                         "gemma3", "gemma3_text", "phi3"}


class _UngatedMLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(x)))


def test_mlp_without_gate_is_a_clear_error_and_nothing_is_patched():
    model = tiny_model("llama")
    model.model.layers[1].mlp = _UngatedMLP(64, 128)
    with pytest.raises(UnsupportedModelError, match=r"model.layers.1 has no gated MLP .*mlp \(_UngatedMLP\)"):
        patch(model)
    assert not patching.is_patched(model)
    assert not any(hasattr(layer.mlp, "_lape") or "forward" in layer.mlp.__dict__ for layer in model.model.layers)


def test_unsupported_activation_is_a_clear_error():
    """The activation is read from the module instance (what runs), not from the config."""
    model = tiny_model("qwen2")
    model.model.layers[1].mlp.act_fn = nn.ReLU()
    with pytest.raises(UnsupportedModelError, match=r"model.layers.1: mlp.act_fn: activation ReLU .*not one of our"):
        patch(model)
    assert not patching.is_patched(model)
    renamed = tiny_model("qwen2")
    renamed.config.hidden_act = "relu"  # the instances still compute SiLU
    patch(renamed)
    assert all(m._lape.activation == "silu" for m in patching.patched_mlps(renamed))


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3"])
def test_generate_on_patched_model(family):
    model = tiny_model(family)
    ids, mask = random_batch(batch=3, seq=7, seed=6, padding="left")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(**kw)
        patch(model)
        got = model.generate(**kw)
    assert torch.equal(got, expected)


def test_loss_with_labels_matches_after_patch():
    """``patch`` installs the chunked LM loss by default: same loss and gradients."""
    model = tiny_model("qwen3")
    ref = copy.deepcopy(model)
    ids, mask = random_batch(batch=2, seq=10, seed=7, padding="right")
    labels = ids.masked_fill(mask == 0, -100)
    expected = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    expected.backward()
    patch(model)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_helpers_gate_up_and_weights():
    for family in ("llama", "phi3"):
        model = patch(tiny_model(family))
        mlp = patching.patched_mlps(model)[0]
        I = 96 if family == "phi3" else 128
        wg, wu, wd = patching.weights(mlp)
        assert wg.shape == (I, 64) and wu.shape == (I, 64) and wd.shape == (64, I)
        x = torch.randn(5, 64)
        g, u = patching.gate_up(mlp, x)
        torch.testing.assert_close(g, x @ wg.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(u, x @ wu.T, rtol=1e-5, atol=1e-5)
        if family == "phi3":  # halves of the fused projection, as views
            assert g.stride(1) == 1 and g.stride(0) == 2 * I
            assert wg.data_ptr() == mlp.gate_up_proj.weight.data_ptr()
    with pytest.raises(RuntimeError, match="not patched"):
        patching.patched_mlps(tiny_model("llama"))


def test_multimodal_gemma3_patches_the_language_model():
    """The vision tower's encoder layers (plain MLPs) come first in module order."""
    model = tiny_gemma3_multimodal()
    ids, mask = random_batch(batch=2, seq=8, seed=8, padding="left")
    expected = _logits(model, ids, mask)
    patch(model)
    assert introspection.decoder_body(model) is model.model.language_model
    assert all("_lape" in layer.mlp.__dict__ for layer in model.model.language_model.layers)
    vision_mlps = [m for n, m in model.model.vision_tower.named_modules() if n.endswith(".mlp")]
    assert vision_mlps and not any(hasattr(m, "_lape") for m in vision_mlps)
    assert torch.equal(_logits(model, ids, mask), expected)
    unpatch(model)
    assert torch.equal(_logits(model, ids, mask), expected)


# ----------------------------------------------------------------------------- the cleanup protocol


def test_cleanups_run_once_newest_first_on_unpatch():
    model = patch(tiny_model("llama", num_layers=1), chunked_loss=False)
    ran = []
    patching.add_cleanup(model, "a", lambda m: ran.append(("a", m)))
    patching.add_cleanup(model, "b", lambda m: ran.append(("b", m)))
    patching.add_cleanup(model, "a", lambda m: ran.append(("a2", m)))  # replaces "a" and is now the newest
    patching.add_cleanup(model, "gone", lambda m: ran.append(("gone", m)))
    patching.drop_cleanup(model, "gone")  # forgotten, never run
    patching.drop_cleanup(model, "never-registered")  # no-op
    unpatch(model)
    assert ran == [("a2", model), ("b", model)]
    _assert_unpatched(model)
    unpatch(model)  # nothing left to run
    assert len(ran) == 2


def test_run_cleanup_runs_now_and_forgets():
    model = patch(tiny_model("llama", num_layers=1), chunked_loss=False)
    ran = []
    patching.add_cleanup(model, "x", lambda m: ran.append("x"))
    patching.run_cleanup(model, "x")
    patching.run_cleanup(model, "x")
    assert ran == ["x"]
    unpatch(model)
    assert ran == ["x"]


def test_consumers_undo_through_cleanups():
    """The chunked loss and the trainable slices are removed by unpatch without patching
    knowing them, and removing one by hand drops its cleanup."""
    from lape_kernels.training import loss, sparse_mlp

    model = tiny_model("qwen2", num_layers=2)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    patch(model, neurons=[torch.tensor([1, 5]), torch.tensor([0])])
    assert loss.has_chunked_loss(model) and sparse_mlp.has_trainable_neurons(model)
    sparse_mlp.clear_trainable_neurons(model)
    assert list(model.__dict__["_lape_cleanups"]) == ["chunked_loss"]
    unpatch(model)
    assert not loss.has_chunked_loss(model) and "forward" not in model.__dict__
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    _assert_unpatched(model)


@pytest.mark.parametrize("bad", [[torch.tensor([1])], [torch.tensor([128]), torch.tensor([0])]])
def test_failed_patch_with_neurons_leaves_the_model_unpatched(bad):
    model = tiny_model("llama", num_layers=2)
    with pytest.raises(ValueError):
        patch(model, neurons=bad)
    _assert_unpatched(model)
    assert "forward" not in model.__dict__ and all(p.requires_grad for p in model.parameters())
