"""#14 end to end: a tiny Qwen3-MoE and a tiny Mixtral go through patch -> record (two languages,
left padding) -> identify -> train a language's expert neurons -> save -> load -> merge, each
step checked against an independent reference (lape_kernels.testing): logits of the unpatched
model, per-expert counts of a hook on an unpatched copy, the LAPE rule's thresholds and ranking
recomputed in float64 from those counts, slice training of the same slices through the stacked
weights."""
from __future__ import annotations

import copy

import pytest
import torch

import lape_kernels as lk
from lape_kernels.testing import adamw_steps, expert_hook_counts, random_batch, slice_training, tiny_model

RATES = dict(top_rate=0.1, filter_rate=0.5, activation_bar_ratio=0.5)


def _entropy64(p: torch.Tensor) -> torch.Tensor:
    """LAPE's entropy of p [U, K] over languages, in float64 (0 log 0 = 0, 0 for an all-zero row)."""
    p = p.double()
    s = p.sum(-1, keepdim=True)
    q = torch.where(s > 0, p / s.clamp(min=1e-300), torch.zeros_like(p))
    return -(torch.where(q > 0, q * q.log(), torch.zeros_like(q))).sum(-1)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_patch_record_identify_train_save_merge(family, tmp_path):
    base = tiny_model(family, num_layers=2)
    ids, mask = random_batch(4, 12, seed=3, padding="left")
    langs = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        want_logits = base(input_ids=ids, attention_mask=mask).logits

    # patch: not one output bit changes
    model = lk.patch(copy.deepcopy(base))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, want_logits)

    # record: per-expert counts equal a hook on the unpatched model
    hook = expert_hook_counts(base, ids, mask, token_lang=langs, num_langs=2)
    with lk.record(model, ["en", "mt"]) as stats:
        stats.set_batch_languages(langs)
        model(input_ids=ids, attention_mask=mask)
    for k, lang in enumerate(["en", "mt"]):
        assert torch.equal(stats[lang].experts.over_zero, hook["over_zero"][k])
        assert torch.equal(stats[lang].experts.routed, hook["routed"][k])

    # identify: probabilities over routed tokens, thresholds and ranking from the hook's counts
    ns = lk.identify(stats, **RATES)
    oz, routed = hook["over_zero"].double(), hook["routed"].double()[..., None]
    p = torch.where(routed > 0, oz / routed.clamp(min=1), torch.zeros_like(oz))  # [K, M, E, I]
    p = p.permute(1, 2, 3, 0).reshape(-1, 2).float()  # units x languages, layer-major
    flat = p.flatten()
    assert ns.thresholds["filter_value"] == flat.kthvalue(round(flat.numel() * 0.5)).values.item()
    bar = flat.kthvalue(round(flat.numel() * 0.5)).values.item()
    assert ns.thresholds["activation_bar"] == bar
    member = torch.zeros_like(p, dtype=torch.bool)
    for k, lang in enumerate(["en", "mt"]):
        for m, row in enumerate(ns.select_experts(lang)):
            for e, idx in enumerate(row):
                member[(m * len(row) + e) * 32 + idx, k] = True
    assert member.any() and bool((p[member] > bar).all())
    ent = _entropy64(p)
    selected = member.any(-1)
    passing = (p > ns.thresholds["filter_value"]).any(-1) & (p > bar).any(-1) & ~selected
    assert int(selected.sum()) <= round(p.shape[0] * 0.1)
    if passing.any():  # one ranking: no unselected candidate has lower entropy than a selected unit
        assert ent[selected].max() <= ent[passing].min() + 1e-6

    # train the language's expert neurons: as slice training of the same slices (3 AdamW steps)
    labels = ids.masked_fill(mask == 0, -100)
    ours = lk.patch(copy.deepcopy(base), neurons=ns, language="mt").train()
    sel = ns.select_experts("mt")
    oracle = copy.deepcopy(base).train()
    oracle_experts = [x.module for x in lk.check_model(oracle).experts]  # before slice training parametrizes them
    got = adamw_steps(ours, lk.trainable_parameters(ours), ids, labels, steps=3)
    want = adamw_steps(oracle, slice_training(oracle, None, sel), ids, labels, steps=3)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)

    # save -> load into a fresh copy -> merge: the same model as the oracle's trained weights
    ours.eval()
    with torch.no_grad():
        trained_logits = ours(input_ids=ids, attention_mask=mask).logits
    lk.save_neurons(ours, tmp_path / "mt")
    fresh = lk.load_neurons(copy.deepcopy(base), tmp_path / "mt")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(input_ids=ids, attention_mask=mask).logits, trained_logits)
    merged = lk.merge(fresh)
    assert not lk.is_patched(merged)
    from torch.nn.utils import parametrize

    changed = 0
    for a, b, b0 in zip(lk.check_model(merged).experts, oracle_experts, lk.check_model(base).experts):
        parametrize.remove_parametrizations(b, "gate_up_proj", leave_parametrized=True)
        parametrize.remove_parametrizations(b, "down_proj", leave_parametrized=True)
        torch.testing.assert_close(a.module.gate_up_proj, b.gate_up_proj, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.module.down_proj, b.down_proj, rtol=0, atol=1e-5)
        changed += int((a.module.gate_up_proj != b0.module.gate_up_proj).sum())
    assert changed > 0
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, trained_logits,
                                   rtol=1e-5, atol=1e-5)
