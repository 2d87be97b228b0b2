"""record() during generate(): only tokens that belong to a sequence count (the prompt without
padding, then each sequence's generated tokens up to and including its end-of-sequence token),
and generating with a patched model gives the unpatched model's tokens."""
from __future__ import annotations

import copy

import pytest
import torch

import lape_kernels as lk
from lape_kernels.testing import PAD_ID, hook_counts, random_batch, tiny_model

PROMPT, NEW = 8, 6


def _generate(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                              pad_token_id=PAD_ID, **kw)


def _an_early_token(model, ids, mask):
    """A token greedy decoding produces early in sequence 0 but not in sequence 1: used as the
    EOS, sequence 0 ends after 2 tokens while sequence 1 runs to the end."""
    gen = _generate(model, ids, mask, eos_token_id=None)[:, PROMPT:]
    for tok in gen[0, :3].tolist():
        if tok not in gen[1].tolist() and tok != PAD_ID:
            return tok
    pytest.fail(f"no usable token in {gen.tolist()}")


def _expected(model, out, mask, eos_ids):
    """The reference: one cache-free forward over what generate fed, with the mask zero on
    padding and on every token fed after a sequence's first EOS."""
    fed = out[:, PROMPT:-1]
    keep = torch.ones_like(fed, dtype=torch.bool)
    for b in range(fed.shape[0]):
        hit = torch.isin(fed[b], torch.tensor(eos_ids)).nonzero().flatten()
        if hit.numel():
            keep[b, int(hit[0]) + 1 :] = False
    return hook_counts(model, out[:, :-1], torch.cat([mask, keep.long()], dim=1)), keep


@pytest.mark.parametrize("how", ["argument", "generation_config", "list"])
def test_tokens_after_eos_are_not_counted(how):
    model = tiny_model("llama")
    ids, mask = random_batch(batch=3, seq=PROMPT, seed=9, padding="left")
    eos = _an_early_token(model, ids, mask)
    if how == "argument":
        kw = {"eos_token_id": eos}
    elif how == "list":
        kw = {"eos_token_id": [250, eos]}
    else:
        model.generation_config.eos_token_id = eos
        kw = {}
    with lk.record(model) as stats:
        out = _generate(model, ids, mask, **kw)
    assert (out[0, PROMPT:] == PAD_ID).any()  # sequence 0 ended and was fed pads
    want, keep = _expected(model, out, mask, [eos])
    assert not keep.all()
    assert stats.n_tokens == int(want["n_tokens"][0]) == int(mask.sum()) + int(keep.sum())
    assert int((stats.over_zero - want["over_zero"][0]).abs().sum()) <= 2  # cached attention: last bits
    assert "generate" not in model.__dict__  # the watch goes with the block


def test_pad_equal_to_eos_and_wrapped_models():
    """Models whose pad token is their EOS (the common case), generating through PEFT."""
    peft = pytest.importorskip("peft")
    model = tiny_model("qwen2")
    ids, mask = random_batch(batch=3, seq=PROMPT, seed=4, padding="left")
    eos = _an_early_token(model, ids, mask)
    p = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with lk.record(p, ["xx"]) as stats:
        stats.set_batch_languages([0, 0, 0])
        with torch.no_grad():
            out = p.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                             pad_token_id=eos, eos_token_id=eos)
    want, keep = _expected(p.base_model.model, out, mask, [eos])
    assert not keep.all() and stats["xx"].n_tokens == int(want["n_tokens"][0])


def test_without_eos_every_generated_token_counts():
    model = tiny_model("gemma2")
    ids, mask = random_batch(batch=2, seq=PROMPT, seed=5, padding="left")
    with lk.record(model) as stats:
        out = _generate(model, ids, mask, eos_token_id=None)
    assert stats.n_tokens == int(mask.sum()) + 2 * (NEW - 1)
    # forwards outside generate() count as their mask says, in the same block
    with lk.record(model) as stats, torch.no_grad():
        model(input_ids=out, attention_mask=torch.ones_like(out))
    assert stats.n_tokens == out.numel()


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3"])
def test_generate_with_patched_and_trained_models_gives_the_same_ids(family):
    """fp32 greedy generation: patched (and patched with untrained neurons) = unpatched."""
    model = tiny_model(family, varied_signs=False)
    ids, mask = random_batch(batch=2, seq=PROMPT, seed=6, padding="left")
    want = _generate(model, ids, mask, eos_token_id=None)
    patched = lk.patch(copy.deepcopy(model))
    assert torch.equal(_generate(patched, ids, mask, eos_token_id=None), want)
    inter = 96 if family == "phi3" else 128
    lk.patch(patched, neurons=[torch.tensor([1, 7]), torch.tensor([3]), torch.tensor([0, 5, inter - 1])])
    assert torch.equal(_generate(patched, ids, mask, eos_token_id=None), want)
