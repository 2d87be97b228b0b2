"""Sparse training of expert neurons (patch(model, expert_neurons=...)): equal to the paper's slice
training of the same (expert, neuron) slices through the stacked weights (lape_kernels.testing.
slice_training: AdamW with decay, clipping), no tensor of an expert weight's shape in a step,
clear errors for bad selections, and save / load / merge."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import WeightShapeSpy

import lape_kernels as lk
from lape_kernels import patching
from lape_kernels.testing import (TINY_MOE_FAMILIES, adamw_steps, bake_slice_training, live_expert_neurons,
                                  random_batch, random_expert_neurons, random_neurons, slice_training, tiny_model)
from lape_kernels.training import sparse_mlp
from lape_kernels.training.io import NeuronFileError

H, E = 64, 4


def batch(seed: int = 4):
    ids, _ = random_batch(2, 8, seed=seed)
    labels = ids.clone()
    labels[0, :2] = -100
    return ids, labels


def stacked(model):
    """Every MoE layer's (gate_up_proj, down_proj), detached copies."""
    return [(x.module.gate_up_proj.detach().clone(), x.module.down_proj.detach().clone())
            for x in lk.check_model(model).experts]


def train_pair(base, expert_neurons, neurons=None, steps: int = 3):
    """(losses of ours, losses of slice training, ours after training, oracle after training)."""
    ids, labels = batch()
    oracle = copy.deepcopy(base)
    oracle_params = slice_training(oracle, neurons, expert_neurons)
    ours = lk.patch(copy.deepcopy(base), neurons=neurons, expert_neurons=expert_neurons, chunked_loss=False)
    ours.train(), oracle.train()
    want = adamw_steps(oracle, oracle_params, ids, labels, steps=steps)
    got = adamw_steps(ours, lk.trainable_parameters(ours), ids, labels, steps=steps)
    return got, want, ours, bake_slice_training(oracle)


# ----------------------------------------------------------------------------- setup


def test_patch_expert_neurons_registers_small_parameters_only():
    model = tiny_model("qwen3_moe", num_layers=2)
    ids, mask = random_batch(3, 10, seed=1, padding="left")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    sel = random_expert_neurons(2, E, 32, 3, seed=1)
    sel[1][2] = torch.zeros(0, dtype=torch.int64)  # an expert with nothing selected
    lk.patch(model, expert_neurons=sel)
    ex0, ex1 = patching.patched_experts(model)
    assert ex0.lape_gate_rows.shape == (12, H) and ex0.lape_up_rows.shape == (12, H) and ex0.lape_down_cols.shape == (H, 12)
    assert ex1.lape_gate_rows.shape == (9, H)
    flat = torch.cat([t + e * 32 for e, t in enumerate(sel[0])])
    assert torch.equal(ex0.lape_neuron_index, flat)  # expert-major flat indices expert * I + neuron
    assert torch.equal(ex0.lape_gate_rows, torch.cat([ex0.gate_up_proj[e, t] for e, t in enumerate(sel[0])]))
    assert torch.equal(ex0.lape_up_rows, torch.cat([ex0.gate_up_proj[e, t + 32] for e, t in enumerate(sel[0])]))
    assert torch.equal(ex0.lape_down_cols, torch.cat([ex0.down_proj[e][:, t] for e, t in enumerate(sel[0])], 1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.mlp.experts.lape_{s}" for i in (0, 1)
                         for s in ("gate_rows", "up_rows", "down_cols")}
    assert [id(p) for p in lk.trainable_parameters(model)] == [id(getattr(x, n)) for x in (ex0, ex1) for n in
                                                               ("lape_gate_rows", "lape_up_rows", "lape_down_cols")]
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    lk.unpatch(model)
    assert not any(n.startswith("lape_") or ".lape_" in n for n, _ in model.named_parameters())
    assert not any(hasattr(m, "lape_neuron_index") for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_unsorted_indices_are_sorted_as_the_dense_path_sorts():
    model = tiny_model("mixtral", num_layers=2)
    sel = random_expert_neurons(2, E, 32, 3)
    sel[0][1] = torch.tensor([9, 2, 5])
    lk.patch(model, expert_neurons=sel)
    assert torch.equal(patching.patched_experts(model)[0].lape_neuron_index[3:6], torch.tensor([32 + 2, 32 + 5, 32 + 9]))


def _bad(sel, m, e, value):
    sel = [list(layer) for layer in sel]
    sel[m][e] = value
    return sel


GOOD = random_expert_neurons(2, E, 32, 2)


@pytest.mark.parametrize("expert_neurons, exc, match", [
    (GOOD[:1], ValueError, r"expert_neurons \(one entry per MoE layer \[0, 1\]\) has 1 entries, expected 2"),
    ([GOOD[0], GOOD[1][:3]], ValueError, r"expert_neurons\[moe layer 1\] \(one entry per expert\) has 3 entries, expected 4"),
    (_bad(GOOD, 1, 2, torch.tensor([32])), ValueError,
     r"expert_neurons\[moe layer 1 = decoder layer 1\]\[expert 2\]: index 32 out of range \[0, 32\)"),
    (_bad(GOOD, 0, 0, torch.tensor([-1])), ValueError, "index -1 out of range"),
    (_bad(GOOD, 0, 3, torch.tensor([4, 2, 4])), ValueError, r"\[expert 3\]: duplicate index 4"),
    (_bad(GOOD, 0, 0, torch.tensor([1], dtype=torch.int32)), TypeError, "int64"),
    (_bad(GOOD, 0, 0, torch.tensor([[1]])), ValueError, "1-D"),
    (_bad(GOOD, 0, 0, [1, 2]), TypeError, "torch.Tensor"),
    ([torch.tensor([1]), GOOD[1]], TypeError, r"\[moe layer 0\] \(one entry per expert\) must be a list with 4 entries"),
    (torch.tensor([1, 2]), TypeError, "list over MoE layers"),
    ([[torch.zeros(0, dtype=torch.int64)] * E] * 2, ValueError, "selects no neuron in any layer"),
])
def test_bad_expert_neurons(expert_neurons, exc, match):
    model = tiny_model("mixtral", num_layers=2)
    with pytest.raises(exc, match=match) as err:
        lk.patch(model, expert_neurons=expert_neurons)
    assert "\n" not in str(err.value)
    assert not lk.is_patched(model) and not sparse_mlp.has_trainable_neurons(model)


def test_neuron_set_with_expert_neurons():
    """A NeuronSet of a MoE model as neurons= trains its dense (shared-expert) and expert neurons;
    as expert_neurons= its expert neurons; language= is required and checked."""
    dense = {"en": random_neurons(2, 48, 3, seed=1), "mt": random_neurons(2, 48, 2, seed=2)}
    experts = {"en": random_expert_neurons(2, E, 32, 2, seed=3), "mt": random_expert_neurons(2, E, 32, 1, seed=4)}
    ns = lk.NeuronSet(dense, num_layers=2, intermediate_size=48, experts=experts, expert_layout=((0, 1), E, 32))
    model = lk.patch(tiny_model("qwen2_moe", num_layers=2), neurons=ns, language="mt")
    assert [tuple(p.shape) for p in lk.trainable_parameters(model)][::3] == [(2, H), (2, H), (4, H), (4, H)]
    assert torch.equal(patching.patched_experts(model)[1].lape_neuron_index,
                       torch.cat([t + e * 32 for e, t in enumerate(experts["mt"][1])]))
    model = lk.patch(tiny_model("qwen2_moe", num_layers=2), expert_neurons=ns, language="en")
    assert [tuple(p.shape) for p in lk.trainable_parameters(model)][::3] == [(8, H), (8, H)]
    with pytest.raises(ValueError, match="pass language="):
        lk.patch(tiny_model("qwen2_moe", num_layers=2), expert_neurons=ns)
    with pytest.raises(KeyError, match="'xx' not in the NeuronSet"):
        lk.patch(tiny_model("qwen2_moe", num_layers=2), expert_neurons=ns, language="xx")
    with pytest.raises(ValueError, match="not both"):
        lk.patch(tiny_model("qwen2_moe", num_layers=2), neurons=ns, expert_neurons=experts["en"], language="en")
    only = lk.NeuronSet({"en": []}, num_layers=0, intermediate_size=0, experts={"en": experts["en"]},
                        expert_layout=((0, 1), E, 32))
    model = lk.patch(tiny_model("mixtral", num_layers=2), neurons=only, language="en")
    assert len(lk.trainable_parameters(model)) == 6


def test_expert_neurons_on_a_dense_model_and_neurons_on_an_all_moe_model():
    with pytest.raises(ValueError, match="the model has no mixture-of-experts layers"):
        lk.patch(tiny_model("llama", num_layers=2), expert_neurons=GOOD)
    with pytest.raises(ValueError, match="the model has no dense MLPs .* use expert_neurons="):
        lk.patch(tiny_model("mixtral", num_layers=2), neurons=random_neurons(2, 32, 3))


def test_unfrozen_stacked_weights_are_rejected():
    model = lk.patch(tiny_model("olmoe", num_layers=2), expert_neurons=GOOD)
    patching.patched_experts(model)[1].down_proj.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"experts of decoder layer 1: the stacked expert weights \(down_proj\) "
                                           "require grad"):
        model(input_ids=batch()[0])


def test_record_and_deactivate_refuse_a_model_training_expert_neurons():
    """The sparse experts forward neither counts nor deactivates: record() and deactivate() say
    so instead of returning zeros / changing nothing."""
    model = lk.patch(tiny_model("mixtral", num_layers=2), expert_neurons=GOOD)
    with pytest.raises(RuntimeError, match=r"record\(\): layers \[0, 1\] run the sparse-training forward"):
        with lk.record(model):
            model(input_ids=batch()[0])
    with pytest.raises(RuntimeError, match=r"deactivate: layers \[0, 1\] run the sparse-training forward"):
        with lk.deactivate(model, expert_neurons=GOOD):
            pass
    dense = lk.patch(tiny_model("llama", num_layers=2), neurons=random_neurons(2, 128, 3))
    with pytest.raises(RuntimeError, match=r"deactivate: layers \[0, 1\] run the sparse-training forward"):
        with lk.deactivate(dense, random_neurons(2, 128, 2)):
            pass


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("family, impl", [(f, "grouped_mm") for f in TINY_MOE_FAMILIES] +
                         [("qwen3_moe", "eager"), ("mixtral", "batched_mm")])
def test_fp32_training_matches_slice_training(family, impl):
    """3 AdamW steps (decay 0.01, clip 1.0): the losses of slice training of the same slices through
    the stacked weights, and after merge its trained weights (fp32 summation orders differ)."""
    base = tiny_model(family, num_layers=2, experts_implementation=impl)
    before = stacked(base)
    sel = live_expert_neurons(base, batch()[0], k=5, seed=2)
    got, want, ours, oracle = train_pair(base, sel)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)
    assert got[-1] < got[0] - 0.05
    for (gu, dn), (gu0, dn0) in zip(stacked(ours), before):  # training never touched the stacked weights
        assert torch.equal(gu, gu0) and torch.equal(dn, dn0)
    lk.merge(ours)
    assert not lk.is_patched(ours)
    changed = 0
    for (gu, dn), (ogu, odn), (gu0, dn0) in zip(stacked(ours), stacked(oracle), before):
        # fp32 summation orders differ (per-expert split GEMMs vs grouped ones over spliced weights), and
        # AdamW's g / sqrt(v) turns a last-bit gradient difference into up to ~1e-5 here; an error is ~lr = 1e-2
        torch.testing.assert_close(gu, ogu, rtol=0, atol=1e-5)
        torch.testing.assert_close(dn, odn, rtol=0, atol=1e-5)
        changed += int((gu != gu0).sum() + (dn != dn0).sum())
    assert changed > 0


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_bf16_training_is_bit_identical_to_slice_training(family):
    """bf16, the model's grouped_mm: per expert the dense sparse MLP's rounding points (the split
    ops; base and slice parts summed in fp32 and rounded once), so the losses are slice training's
    bit for bit (intermediate 128: the CPU's bf16 GEMM and our fp32 block sums then agree, as in
    the dense tests)."""
    base = tiny_model(family, num_layers=2, intermediate=128, dtype=torch.bfloat16)
    sel = live_expert_neurons(base, batch()[0], k=6, seed=2)
    got, want, _, _ = train_pair(base, sel)
    assert got == want and got[-1] < got[0] - 0.05


def test_bf16_qwen2_moe_and_batched_mm_to_bf16_tolerance():
    """Where the unpatched model's own bf16 sums run in another order (Qwen2-MoE: the block's input
    gradient from shared expert, router and experts accumulated in autograd's order; batched_mm:
    one bmm per row), agreement to bf16 rounding."""
    for family, impl in (("qwen2_moe", "grouped_mm"), ("olmoe", "batched_mm")):
        base = tiny_model(family, num_layers=2, intermediate=128, dtype=torch.bfloat16, experts_implementation=impl)
        sel = live_expert_neurons(base, batch()[0], k=6, seed=2)
        got, want, _, _ = train_pair(base, sel)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-3, atol=0)
        assert got[-1] < got[0] - 0.05


def test_shared_experts_and_routed_experts_together():
    """Qwen2-MoE: neurons= (the shared experts, dense MLPs) and expert_neurons= in one model."""
    base = tiny_model("qwen2_moe", num_layers=2)
    ids = batch()[0]
    neurons = random_neurons(2, 48, 5, seed=3)
    sel = live_expert_neurons(base, ids, k=4, seed=1)
    got, want, ours, oracle = train_pair(base, sel, neurons=neurons)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)
    params = lk.trainable_parameters(ours)
    assert len(params) == 12 and params[0].shape == (5, H) and params[6].shape == (16, H)
    lk.merge(ours)
    for (gu, dn), (ogu, odn) in zip(stacked(ours), stacked(oracle)):
        torch.testing.assert_close(gu, ogu, rtol=0, atol=1e-5)
        torch.testing.assert_close(dn, odn, rtol=0, atol=1e-5)
    for a, b in zip(ours.model.layers, oracle.model.layers):
        torch.testing.assert_close(a.mlp.shared_expert.gate_proj.weight, b.mlp.shared_expert.gate_proj.weight,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_autocast_bf16_matches_slice_training_bit_for_bit(impl):
    """fp32 model under CPU bf16 autocast: eager experts run their GEMMs in bf16 (F.linear is
    autocast), grouped_mm experts in the weights' dtype (transformers casts the rows; grouped_mm is
    not autocast): the sparse experts follow each, so the losses are slice training's bit for bit
    (intermediate 128, as the bf16 test: the CPU bf16 GEMM and our fp32 block sums then agree)."""
    base = tiny_model("qwen3_moe", num_layers=2, intermediate=128, experts_implementation=impl)
    ids, labels = batch()
    sel = random_expert_neurons(2, E, 128, 4, seed=0)
    oracle = copy.deepcopy(base)
    oracle_params = slice_training(oracle, None, sel)
    ours = lk.patch(copy.deepcopy(base), expert_neurons=sel, chunked_loss=False)
    ours.train(), oracle.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = adamw_steps(oracle, oracle_params, ids, labels, steps=2)
        got = adamw_steps(ours, lk.trainable_parameters(ours), ids, labels, steps=2)
    assert got == want


def test_gradient_checkpointing_gives_the_same_gradients():
    base = tiny_model("mixtral", num_layers=2)
    ids, labels = batch()
    grads = []
    for checkpointing in (False, True):
        model = lk.patch(copy.deepcopy(base), expert_neurons=GOOD).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=ids, labels=labels).loss.backward()
        grads.append([p.grad for p in lk.trainable_parameters(model)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("recompute", ["up", "gate_up"])
def test_recompute_gives_the_same_gradients(recompute):
    base = tiny_model("olmoe", num_layers=2)
    ids, labels = batch()
    grads = []
    for mode in ("none", recompute):
        model = lk.patch(copy.deepcopy(base), expert_neurons=GOOD, recompute=mode).train()
        model(input_ids=ids, labels=labels).loss.backward()
        grads.append([p.grad for p in lk.trainable_parameters(model)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_no_expert_weight_shaped_tensor_is_created(impl):
    inter = 64  # I * H = 4096 > every activation of the step (logits of 14 tokens: 3584)
    model = tiny_model("mixtral", num_layers=2, intermediate=inter, experts_implementation=impl)
    lk.patch(model, expert_neurons=random_expert_neurons(2, E, inter, 5)).train()
    ids = random_batch(2, 7, seed=4)[0]
    known = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    spy = WeightShapeSpy([(E, 2 * inter, H), (E, H, inter), (2 * inter, H), (inter, H), (H, inter)], inter * H, known)
    with spy:
        model(input_ids=ids, labels=ids).loss.backward()
    assert spy.hits == []
    for n, p in model.named_parameters():
        assert (p.grad is not None) == ("lape_" in n), n


def test_the_spy_catches_slice_training():
    inter = 64
    model = tiny_model("mixtral", num_layers=2, intermediate=inter)
    params = slice_training(model, None, random_expert_neurons(2, E, inter, 5))
    ids = random_batch(2, 7, seed=4)[0]
    known = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    spy = WeightShapeSpy([(E, 2 * inter, H), (E, H, inter), (2 * inter, H), (inter, H), (H, inter)], inter * H, known)
    with spy:
        model(input_ids=ids, labels=ids).loss.backward()
    assert params[0].grad is not None and any(shape == (E, 2 * inter, H) for _, shape in spy.hits)


# ----------------------------------------------------------------------------- save / load / merge


def test_save_load_merge_carry_the_expert_slices(tmp_path):
    base = tiny_model("qwen2_moe", num_layers=2)
    ids, labels = batch()
    neurons = random_neurons(2, 48, 3, seed=5)
    sel = random_expert_neurons(2, E, 32, 3, seed=6)
    sel[1] = [torch.zeros(0, dtype=torch.int64)] * E  # a MoE layer without neurons
    model = lk.patch(copy.deepcopy(base), neurons=neurons, expert_neurons=sel).train()
    adamw_steps(model, lk.trainable_parameters(model), ids, labels, steps=2)
    trained = [p.detach().clone() for p in lk.trainable_parameters(model)]
    lk.save_neurons(model, tmp_path / "n")
    config = json.loads((tmp_path / "n" / "lape_config.json").read_text())
    assert config["experts"]["counts"] == [[3] * E, [0] * E] and config["total_neurons"] == 6 + 12
    assert config["experts"]["layers"] == [0, 1] and config["language"] is None
    assert config["format_version"] == 2  # a reader of the dense-only version 1 refuses it
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits

    fresh = lk.load_neurons(copy.deepcopy(base), tmp_path / "n")
    assert all(torch.equal(a, b) for a, b in zip(lk.trainable_parameters(fresh), trained))
    assert all(p.requires_grad for p in lk.trainable_parameters(fresh))
    assert torch.equal(patching.patched_experts(fresh)[0].lape_neuron_index,
                       patching.patched_experts(model)[0].lape_neuron_index)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(input_ids=ids).logits, want)

    merged = lk.merge(fresh)
    assert not lk.is_patched(merged) and list(merged.state_dict()) == list(base.state_dict())
    ex_trained = trained[6:]
    for x, x0, layer_sel in zip(lk.check_model(merged).experts, lk.check_model(base).experts, sel):
        gu, dn, gu0, dn0 = x.module.gate_up_proj, x.module.down_proj, x0.module.gate_up_proj, x0.module.down_proj
        rest_gu, rest_dn = torch.ones(gu.shape[:2], dtype=torch.bool), torch.ones(E, 32, dtype=torch.bool)
        slot = 0
        for e, t in enumerate(layer_sel):
            k = t.numel()
            if k:
                pg, pu, pd = ex_trained
                assert torch.equal(gu[e, t], pg[slot:slot + k]) and torch.equal(gu[e, t + 32], pu[slot:slot + k])
                assert torch.equal(dn[e][:, t], pd[:, slot:slot + k])
            rest_gu[e, t], rest_gu[e, t + 32], rest_dn[e, t] = False, False, False
            slot += k
        assert torch.equal(gu[rest_gu], gu0[rest_gu]) and torch.equal(dn.transpose(1, 2)[rest_dn], dn0.transpose(1, 2)[rest_dn])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_load_errors_name_the_file_and_the_cause(tmp_path):
    base = tiny_model("mixtral", num_layers=2)
    lk.save_neurons(lk.patch(copy.deepcopy(base), expert_neurons=GOOD), tmp_path / "n")
    with pytest.raises(NeuronFileError, match="model_type 'mixtral', model is 'olmoe'"):
        lk.load_neurons(tiny_model("olmoe", num_layers=2), tmp_path / "n")
    config_path = tmp_path / "n" / "lape_config.json"
    config = json.loads(config_path.read_text())
    config["experts"]["counts"][0] = [3, 2, 2, 2]
    config_path.write_text(json.dumps(config))
    with pytest.raises(NeuronFileError, match=r"experts.0.index is torch.int64 \(8,\), expected torch.int64 \(9,\)"):
        lk.load_neurons(copy.deepcopy(base), tmp_path / "n")
    config["experts"]["counts"][0] = [3, 1, 2, 2]
    config_path.write_text(json.dumps(config))
    with pytest.raises(NeuronFileError, match=r"experts.0.index does not match experts 'counts'\[0\] \[3, 1, 2, 2\]"):
        lk.load_neurons(copy.deepcopy(base), tmp_path / "n")
    config["experts"]["counts"][0] = [2, 2, 2]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"experts 'counts' must list 2 lists of 4 ints"):
        lk.load_neurons(copy.deepcopy(base), tmp_path / "n")
    config["format_version"] = 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(NeuronFileError, match="format_version 1 with an 'experts' entry"):
        lk.load_neurons(copy.deepcopy(base), tmp_path / "n")
    config["format_version"] = 2
    config["experts"]["num_experts"] = 8
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="experts num_experts mismatch: file has 8, model has 4"):
        lk.load_neurons(copy.deepcopy(base), tmp_path / "n")
