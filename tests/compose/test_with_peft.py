"""PEFT and lape_kernels together: a PEFT model is seen through by every entry point, adapters
on the MLP projections are either computed exactly or refused with the layer named, and what
trains when LoRA and neurons are combined is explicit."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lape_kernels as lk
from lape_kernels import UnsupportedModelError, introspection, patching, wrappers
from lape_kernels.testing import hook_counts, random_batch, random_neurons, slice_training, tiny_model

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

ATTN = ["q_proj", "v_proj"]
MLP = {"llama": ["gate_proj", "up_proj", "down_proj"], "phi3": ["gate_up_proj", "down_proj"]}


def lora(model, targets, task_type="CAUSAL_LM", **kw):
    """LoRA with random (non-zero) B, so that the adapter changes the outputs."""
    torch.manual_seed(5)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task_type,
                                            init_lora_weights=False, **kw))


def neurons(model):
    shape = introspection.mlp_shape(wrappers.unwrap(model))
    return random_neurons(shape.num_layers, shape.intermediate_size, 5, seed=1)


def test_patch_a_peft_model_gives_the_peft_loss_and_gradients():
    """The chunked loss goes on the causal LM inside the PeftModelForCausalLM (it used to go on
    the PEFT wrapper and multiply the inner model's logits by lm_head: a shape error)."""
    ids, mask = random_batch(padding="left")
    p = lora(tiny_model("llama"), ATTN)
    ref = copy.deepcopy(p)
    assert lk.patch(p) is p and lk.is_patched(p) and lk.is_patched(p.base_model.model)
    inner = p.base_model.model
    assert "forward" in inner.__dict__ and "forward" not in p.__dict__
    got = p(input_ids=ids, attention_mask=mask, labels=ids)
    want = ref(input_ids=ids, attention_mask=mask, labels=ids)
    assert got.logits is None
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    got.loss.backward()
    want.loss.backward()
    for (name, a), (_, b) in zip(p.named_parameters(), ref.named_parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert lk.unpatch(p) is p and not lk.is_patched(p) and "forward" not in inner.__dict__


def test_every_entry_point_sees_through_peft(tmp_path):
    ids, mask = random_batch(padding="right")
    p = lora(tiny_model("qwen2"), ATTN)
    ns = neurons(p)
    base = p.base_model.model
    want = hook_counts(base, ids, mask)
    with torch.no_grad(), lk.record(p) as stats:
        p(input_ids=ids, attention_mask=mask)
    assert torch.equal(stats.over_zero, want["over_zero"][0]) and stats.n_tokens == int(mask.sum())
    assert not lk.is_patched(p)
    with torch.no_grad(), lk.deactivate(p, ns) as same:
        assert same is p
        deactivated = p(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad(), lk.deactivate(base, ns):
        assert torch.equal(base(input_ids=ids, attention_mask=mask).logits, deactivated)

    lk.patch(p, neurons=ns, keep_trainable=False)
    params = lk.trainable_parameters(p)
    assert params and all(q.requires_grad for q in params)
    with torch.no_grad():
        for q in params:
            q.add_(0.1 * torch.randn_like(q))
        trained = p(input_ids=ids, attention_mask=mask).logits
    assert lk.save_neurons(p, tmp_path / "n") == tmp_path / "n"
    fresh = lora(tiny_model("qwen2"), ATTN)
    fresh.load_state_dict({k: v for k, v in p.state_dict().items() if "lora_" in k}, strict=False)
    assert lk.load_neurons(fresh, tmp_path / "n") is fresh and lk.is_patched(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).logits, trained, rtol=0, atol=0)
    assert lk.merge(p) is p and not lk.is_patched(p) and "forward" not in base.__dict__
    with torch.no_grad():
        torch.testing.assert_close(p(input_ids=ids, attention_mask=mask).logits, trained, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_lora_on_the_mlp_is_refused_by_every_path_that_reads_the_weights(family):
    ids, mask = random_batch()
    p = lora(tiny_model(family), MLP[family])
    proj = MLP[family][0]
    state = copy.deepcopy(p.state_dict())
    for call in (lambda: lk.patch(p), lambda: lk.record(p).__enter__(), lambda: lk.deactivate(p, random_neurons(3, 128, 2)).__enter__(),
                 lambda: lk.record(p, fused_gemm=True).__enter__()):
        with pytest.raises(UnsupportedModelError, match=rf"model\.layers\.0\.mlp\.{proj} \(lora\.Linear\).*merge_and_unload"):
            call()
        assert not lk.is_patched(p)
    assert all(torch.equal(v, state[k]) for k, v in p.state_dict().items())


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_lora_on_the_mlp_after_patch(family):
    """The plain patched forward calls the projections, adapter included: it equals the
    unpatched model with the same adapter, bit for bit. Counting and sparse training read the
    base weights: they refuse, naming the layer (they used to compute the model without LoRA)."""
    ids, mask = random_batch(padding="left")
    ref = lora(tiny_model(family), MLP[family])
    model = lk.patch(tiny_model(family))
    p = lora(model, MLP[family])
    p.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert torch.equal(p(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits)
    for fused in (False, True):
        with pytest.raises(UnsupportedModelError, match=r"record\(\).*mlp\..* \(lora\.Linear\)"):
            lk.record(p, fused_gemm=fused).__enter__()
        assert not patching.is_recording(p)

    trained = lk.patch(tiny_model(family), neurons=random_neurons(3, 96 if family == "phi3" else 128, 4))
    q = lora(trained, MLP[family])
    with pytest.raises(RuntimeError, match=r"layer 0: the MLP's .*\(lora\.Linear\).*merge the adapter first"):
        q(input_ids=ids, attention_mask=mask)
    # the adapter hides the MLPs from discovery: unpatch still finds what patch changed
    for patched in (model, trained):
        lk.unpatch(patched)
        assert not lk.is_patched(patched) and not any("lape_" in n for n, _ in patched.named_parameters())
        assert not any("forward" in m.__dict__ for m in patched.modules() if type(m).__name__.endswith("MLP"))
    with torch.no_grad():
        assert torch.equal(p(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits)


def test_fused_gemm_falls_back_to_the_module_call_for_adapter_layers():
    """Defence in depth: should an adapter appear on a gate/up projection of a patched MLP, the
    fused-GEMM counting path (which reads the base weights) does not apply."""
    model = lk.patch(tiny_model("llama", num_layers=1))
    mlp = model.model.layers[0].mlp
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert patching._fused_gemm_applies(mlp, x)
        lora(model, ["gate_proj"], task_type=None)
        assert not patching._fused_gemm_applies(mlp, x)


def test_lora_on_the_lm_head_keeps_hf_loss():
    """An adapter on the LM head (added after patch) is not a plain Linear: the chunked loss
    steps aside and HF's loss, adapter included, is computed."""
    ids, _ = random_batch()
    ref = lora(tiny_model("llama", num_layers=1), ["lm_head"])
    model = lk.patch(tiny_model("llama", num_layers=1))
    p = lora(model, ["lm_head"])
    p.load_state_dict(ref.state_dict())
    got, want = p(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    assert got.logits is not None
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)


def test_neurons_and_attention_lora_train_together_exactly():
    """LoRA on attention + neurons with keep_trainable=True: both train, with the loss and the
    gradients of the paper's slice training plus the same LoRA."""
    ids, mask = random_batch(padding="right")
    labels = ids.masked_fill(mask == 0, -100)
    base = tiny_model("llama", num_layers=2)
    ns = random_neurons(2, 128, 6, seed=2)

    ref = lora(copy.deepcopy(base), ATTN)
    slices = slice_training(ref.base_model.model, ns)  # freezes everything, LoRA included
    ref_lora = [q for n, q in ref.named_parameters() if "lora_" in n]
    for q in ref_lora:
        q.requires_grad_(True)

    p = lora(copy.deepcopy(base), ATTN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.patch(p, neurons=ns, keep_trainable=True)
    ours_lora = [q for n, q in p.named_parameters() if "lora_" in n]
    assert all(q.requires_grad for q in ours_lora)
    trainable = {n for n, q in p.named_parameters() if q.requires_grad}
    assert trainable == {n for n in trainable if "lora_" in n or "lape_" in n}  # nothing else

    want = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = p(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    want.backward()
    got.backward()
    for a, b in zip(lk.trainable_parameters(p), slices):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    for a, b in zip(ours_lora, ref_lora):
        assert a.grad is not None and a.grad.abs().sum() > 0
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_freezing_the_adapter_is_explicit():
    """patch(peft_model, neurons=...) freezes the LoRA weights: a warning says so unless
    keep_trainable says what is wanted."""
    p = lora(tiny_model("llama", num_layers=2), ATTN)
    ns = neurons(p)
    with pytest.warns(UserWarning, match=r"froze 8 trainable adapter parameters .*keep_trainable=True"):
        lk.patch(p, neurons=ns)
    assert not any(q.requires_grad for n, q in p.named_parameters() if "lora_" in n)
    lk.unpatch(p)
    assert all(q.requires_grad for n, q in p.named_parameters() if "lora_" in n)  # flags restored
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.patch(p, neurons=ns, keep_trainable=False)
    with pytest.raises(ValueError, match="keep_trainable applies to sparse neuron training"):
        lk.patch(p, keep_trainable=True)


def test_peft_after_patch_freezing_the_neurons_warns():
    """get_peft_model after patch(neurons=...) freezes the lape_* slices (it freezes every
    non-adapter parameter): the training forward says so instead of training nothing."""
    ids, _ = random_batch()
    model = lk.patch(tiny_model("llama", num_layers=2), neurons=random_neurons(2, 128, 3)).train()
    p = lora(model, ATTN)
    assert not any(q.requires_grad for q in lk.trainable_parameters(p))
    with pytest.warns(UserWarning, match=r"neuron slices .* are frozen.*get_peft_model"):
        p(input_ids=ids, labels=ids).loss.backward()
    for q in lk.trainable_parameters(p):
        q.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p(input_ids=ids, labels=ids).loss.backward()
    assert all(q.grad is not None for q in lk.trainable_parameters(p))
