"""accelerate and lape_kernels: a patched model prepared with mixed precision trains, and
``merge`` (or ``unpatch``) leaves a plain Hugging Face model, whatever accelerate wrapped around
the patched forward in between."""
from __future__ import annotations

import pytest
import torch

import lape_kernels as lk
from lape_kernels.testing import random_batch, random_neurons, tiny_model

accelerate = pytest.importorskip("accelerate")


def _assert_plain(model):
    assert not lk.is_patched(model)
    assert "forward" not in model.__dict__ and "_original_forward" not in model.__dict__
    assert not any(k.startswith("_lape") for k in model.__dict__)
    for layer in model.model.layers:
        assert "forward" not in layer.mlp.__dict__


@pytest.mark.parametrize("finish", ["merge", "unpatch"])
def test_merge_after_bf16_prepare_leaves_a_plain_model(finish):
    ids, _ = random_batch(batch=2, seq=8)
    model = tiny_model("llama", num_layers=2)
    lk.patch(model, neurons=random_neurons(2, 128, 4))
    acc = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
    opt = torch.optim.AdamW(lk.trainable_parameters(model), lr=1e-2)
    prepared, opt = acc.prepare(model, opt)
    assert "_original_forward" in model.__dict__  # accelerate wrapped our instance forward in autocast
    loss = prepared(input_ids=ids, labels=ids).loss
    assert loss.dtype == torch.float32 and prepared(input_ids=ids).logits is not None
    acc.backward(loss)
    opt.step()
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if "lape_" in n}

    unwrapped = acc.unwrap_model(prepared)
    if finish == "merge":
        assert lk.merge(unwrapped) is unwrapped
        w = unwrapped.model.layers[0].mlp.gate_proj.weight
        sel = random_neurons(2, 128, 4)[0]
        assert torch.equal(w[sel], trained["model.layers.0.mlp.lape_gate_rows"])
    else:
        lk.unpatch(unwrapped)
    _assert_plain(unwrapped)
    out = unwrapped(input_ids=ids, labels=ids)
    assert out.logits is not None and out.loss is not None  # HF's own forward, not the chunked one
    assert lk.patch(unwrapped) is unwrapped and lk.is_patched(unwrapped)  # accepted again
    torch.testing.assert_close(unwrapped(input_ids=ids, labels=ids).loss, out.loss, rtol=1e-6, atol=1e-6)


def test_patch_after_prepare_is_refused_and_changes_nothing():
    """After prepare, the instance forward is accelerate's autocast wrapper: stacking the chunked
    loss on it would bypass autocast. A clear refusal, the model as it was."""
    model = tiny_model("llama", num_layers=1)
    acc = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
    prepared = acc.prepare(model)
    before = dict(model.__dict__)
    with pytest.raises(RuntimeError, match=r"instance-level forward \(accelerate\..*before accelerate's prepare"):
        lk.patch(prepared)
    assert dict(model.__dict__) == before and not lk.is_patched(model)
    lk.patch(prepared, chunked_loss=False)  # counting and training without the chunked loss: fine
    assert lk.is_patched(model) and model.__dict__["forward"] is before["forward"]
