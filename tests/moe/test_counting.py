"""Patched MoE models: logits bit-identical to the unpatched model, and record() per-expert counts
equal to an independent recomputation of each expert's act(gate) over the tokens the router sent
to it (lape_kernels.testing.expert_hook_counts)."""
from __future__ import annotations

import copy

import pytest
import torch

import lape_kernels as lk
from lape_kernels.testing import TINY_MOE_FAMILIES, expert_hook_counts, hook_counts, random_batch, tiny_model

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_logits_bit_identical(family, dtype):
    ids, mask = random_batch(3, 10, seed=1, padding="left")
    for impl in IMPLEMENTATIONS:
        model = tiny_model(family, dtype=dtype, num_layers=2, experts_implementation=impl)
        want = _logits(model, ids, mask)
        lk.patch(model)
        assert len(lk.patching.patched_experts(model)) == 2
        assert torch.equal(_logits(model, ids, mask), want), (family, impl, dtype)
        lk.unpatch(model)
        assert not any("forward" in m.__dict__ or hasattr(m, "_lape") for m in model.modules())
        assert torch.equal(_logits(model, ids, mask), want)


@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_record_counts_equal_the_expert_reference(family, impl):
    """Two languages, per-sequence ids, left padding: per expert over_zero exact, act_sum close,
    routed = (token, expert) pairs; dense MLPs (Qwen2-MoE's shared expert) as the dense hook."""
    model = tiny_model(family, num_layers=2, experts_implementation=impl)
    ids, mask = random_batch(4, 12, seed=2, padding="left")
    langs = torch.tensor([0, 1, 1, 0])
    want = expert_hook_counts(model, ids, mask, token_lang=langs, num_langs=2)
    with lk.record(model, ["en", "mt"]) as stats:
        stats.set_batch_languages(langs)
        model(input_ids=ids, attention_mask=mask)
    dense = None
    if stats["en"].num_layers:
        dense = hook_counts(model, ids, mask, token_lang=langs, num_langs=2)
    for k, lang in enumerate(["en", "mt"]):
        ex = stats[lang].experts
        assert ex.layers == (0, 1)
        assert torch.equal(ex.over_zero, want["over_zero"][k]), (lang, (ex.over_zero != want["over_zero"][k]).sum())
        assert torch.equal(ex.routed, want["routed"][k])
        torch.testing.assert_close(ex.act_sum, want["act_sum"][k], rtol=1e-5, atol=1e-4)
        n = int(mask[langs == k].sum())
        assert stats[lang].n_tokens == n
        assert (ex.routed.sum(1) == 2 * n).all()  # top-2: each token counts once per expert it is routed to
        assert 0 < ex.over_zero.sum() < ex.routed[..., None].expand_as(ex.over_zero).sum()
        if dense is not None:
            assert torch.equal(stats[lang].over_zero, dense["over_zero"][k])
    if family != "qwen2_moe":
        assert stats["en"].shape == (0, 0)


def test_per_token_languages_and_right_padding():
    model = tiny_model("qwen3_moe", num_layers=2)
    ids, mask = random_batch(3, 10, seed=3, padding="right")
    g = torch.Generator().manual_seed(0)
    langs = torch.randint(-1, 2, (3, 10), generator=g)
    want = expert_hook_counts(model, ids, mask, token_lang=langs, num_langs=2)
    with lk.record(model, ["a", "b"]) as stats:
        stats.set_batch_languages(langs)
        model(input_ids=ids, attention_mask=mask)
    for k, lang in enumerate(["a", "b"]):
        assert torch.equal(stats[lang].experts.over_zero, want["over_zero"][k])
        assert torch.equal(stats[lang].experts.routed, want["routed"][k])


def test_stats_save_load_add_carry_the_experts(tmp_path):
    model = tiny_model("mixtral", num_layers=2)
    ids, mask = random_batch(3, 10, seed=4, padding="left")
    with lk.record(model) as stats:
        model(input_ids=ids, attention_mask=mask)
    stats.save(tmp_path / "s.safetensors")
    back = lk.ActivationStats.load(tmp_path / "s.safetensors")
    assert back.equal(stats) and back.experts.layers == (0, 1)
    total = back + stats
    assert torch.equal(total.experts.routed, 2 * stats.experts.routed)
    assert torch.equal(total.experts.over_zero, 2 * stats.experts.over_zero)
    back.validate(model)
    with pytest.raises(ValueError, match="LAPE reference format has no experts"):
        stats.to_lape_dict()
    dense = tiny_model("llama", num_layers=2)
    with pytest.raises(ValueError, match="expert statistics"):
        back.validate(dense)
    with pytest.raises(ValueError, match="different experts"):
        back + lk.ActivationStats(torch.zeros(0, 0, dtype=torch.int64), None, back.n_tokens)


def test_gpt_oss_experts_are_refused_with_the_reason():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt_oss", vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                               num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(lk.UnsupportedModelError, match="_apply_gate is its own gating"):
        lk.check_model(model)
    with pytest.raises(lk.UnsupportedModelError):
        lk.patch(model)
    assert not lk.is_patched(model)
