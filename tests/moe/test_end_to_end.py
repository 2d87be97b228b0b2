"""#14 done-when: a tiny Qwen3-MoE and a tiny Mixtral go through patch -> record (two languages,
padded) -> identify -> train a language's expert neurons -> save -> merge, each step checked
against an independent reference (lape_kernels.testing):

- patch: logits bit-identical to the unpatched model;
- record: per-expert over_zero / routed equal to ``expert_hook_counts`` (each expert's act(gate)
  recomputed on an unpatched copy over the tokens its router sent to it), act_sum close;
- identify: the LAPE reference selection (``lape_reference_select``, the reference script's
  operations) on probabilities over_zero / routed computed from the reference counts;
- train: 3 AdamW steps (decay, clipping) of the language's expert neurons equal the paper's slice
  training of the same slices through the stacked weights (``slice_training``);
- save -> load: the same slices on a fresh copy; merge: exactly the trained slices in the stacked
  weights, nothing else changed, and the merged plain model computes slice training's function.
"""
from __future__ import annotations

import copy

import pytest
import torch

import lape_kernels as lk
from lape_kernels.testing import (adamw_steps, bake_slice_training, expert_hook_counts, lape_reference_select,
                                  random_batch, slice_training, tiny_model)

LANGS = ("en", "mt")
RATES = dict(top_rate=0.05, filter_rate=0.9, activation_bar_ratio=0.5)  # ~8 expert neurons per language


def two_language_batch():
    """8 left-padded sequences: "en" draws tokens from [3, 120), "mt" from [136, 256)."""
    ids, mask = random_batch(8, 16, seed=7, padding="left")
    g = torch.Generator().manual_seed(8)
    langs = torch.tensor([0, 1] * 4)
    en = torch.randint(3, 120, ids.shape, generator=g)
    mt = torch.randint(136, 256, ids.shape, generator=g)
    ids = torch.where(langs[:, None] == 0, en, mt).masked_fill(mask == 0, 0)
    return ids, mask, langs


def reference_selection(ref):
    """Per language, per MoE layer, per expert: the reference LAPE rule on over_zero / routed."""
    M, E, I = ref["over_zero"].shape[1:]
    routed = ref["routed"][..., None]
    probs = torch.where(routed > 0, ref["over_zero"].double() / routed.clamp(min=1), 0.0).float()  # [K, M, E, I]
    member, filter_value, bar = lape_reference_select(probs.reshape(len(LANGS), -1).t().contiguous(), **RATES)
    member = member.t().reshape(len(LANGS), M, E, I)
    return [[[torch.nonzero(member[k, m, e]).flatten() for e in range(E)] for m in range(M)]
            for k in range(len(LANGS))], filter_value, bar


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_patch_record_identify_train_save_merge(family, tmp_path):
    base = tiny_model(family, num_layers=2)
    ids, mask, langs = two_language_batch()

    # patch: the same logits, bit for bit
    model = lk.patch(copy.deepcopy(base))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           base(input_ids=ids, attention_mask=mask).logits)

    # record: two languages, left padding
    with lk.record(model, list(LANGS)) as stats:
        stats.set_batch_languages(langs)
        model(input_ids=ids, attention_mask=mask)
    ref = expert_hook_counts(base, ids, mask, token_lang=langs, num_langs=2)
    for k, lang in enumerate(LANGS):
        ex = stats[lang].experts
        assert torch.equal(ex.over_zero, ref["over_zero"][k]) and torch.equal(ex.routed, ref["routed"][k])
        torch.testing.assert_close(ex.act_sum, ref["act_sum"][k], rtol=1e-5, atol=1e-4)
        assert stats[lang].n_tokens == int(mask[langs == k].sum())

    # identify: the reference rule on the reference counts
    ns = lk.identify({lang: stats[lang] for lang in LANGS}, **RATES)
    want, filter_value, bar = reference_selection(ref)
    assert ns.thresholds["filter_value"] == filter_value and ns.thresholds["activation_bar"] == bar
    for k, lang in enumerate(LANGS):
        got = ns.select_experts(lang)
        assert [[t.tolist() for t in row] for row in got] == [[t.tolist() for t in row] for row in want[k]], lang
    assert ns.total("mt") > 0 and ns.model_fingerprint == lk.model_fingerprint(base)

    # train mt's expert neurons (the NeuronSet as patch takes it) == slice training of the same slices
    sel = ns.select_experts("mt")
    train_ids = ids[langs == 1].masked_fill(mask[langs == 1] == 0, 137)  # mt text without padding
    labels = train_ids.clone()
    labels[:, :3] = -100
    oracle = copy.deepcopy(base)
    oracle_params = slice_training(oracle, None, sel)
    ours = lk.patch(copy.deepcopy(base), neurons=ns, language="mt")
    ours.train(), oracle.train()
    want_losses = adamw_steps(oracle, oracle_params, train_ids, labels, steps=3)
    got_losses = adamw_steps(ours, lk.trainable_parameters(ours), train_ids, labels, steps=3)
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(want_losses), rtol=1e-5, atol=0)
    assert got_losses[-1] < got_losses[0]
    trained = [p.detach().clone() for p in lk.trainable_parameters(ours)]

    # save -> load onto a fresh copy -> merge
    lk.save_neurons(ours, tmp_path / "mt")
    loaded = lk.load_neurons(copy.deepcopy(base), tmp_path / "mt")
    assert all(torch.equal(a, b) for a, b in zip(lk.trainable_parameters(loaded), trained))
    merged = lk.merge(loaded).eval()
    assert not lk.is_patched(merged) and list(merged.state_dict()) == list(base.state_dict())
    slices = iter(trained)
    for x, x0, per_expert in zip(lk.check_model(merged).experts, lk.check_model(base).experts, sel):
        if not sum(t.numel() for t in per_expert):
            continue
        pg, pu, pd = next(slices), next(slices), next(slices)
        gu, dn, gu0, dn0 = x.module.gate_up_proj, x.module.down_proj, x0.module.gate_up_proj, x0.module.down_proj
        I = x.intermediate_size
        keep_gu, keep_dn, slot = torch.ones(gu.shape[:2], dtype=torch.bool), torch.ones(dn.shape[0], I, dtype=torch.bool), 0
        for e, t in enumerate(per_expert):
            n = t.numel()
            assert torch.equal(gu[e, t], pg[slot:slot + n]) and torch.equal(gu[e, t + I], pu[slot:slot + n])
            assert torch.equal(dn[e][:, t], pd[:, slot:slot + n])
            keep_gu[e, t], keep_gu[e, t + I], keep_dn[e, t], slot = False, False, False, slot + n
        assert torch.equal(gu[keep_gu], gu0[keep_gu])
        assert torch.equal(dn.transpose(1, 2)[keep_dn], dn0.transpose(1, 2)[keep_dn])
    bake_slice_training(oracle.eval())
    with torch.no_grad():
        got, want_logits = (m(input_ids=ids, attention_mask=mask).logits for m in (merged, oracle))
    assert float((got - want_logits).abs().max()) <= 1e-5 * float(want_logits.abs().max())
