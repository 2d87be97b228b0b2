"""Sparse neuron fine-tuning: exactness against the paper's method, memory-leanness, and the
training features it must survive (autocast, checkpointing, accumulation, torch.compile)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import WeightShapeSpy
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lape_kernels
from lape_kernels import patching
from lape_kernels.training import sparse_mlp
from lape_kernels.testing import TINY_FAMILIES as FAMILIES
from lape_kernels.testing import adamw_steps, bake_slice_training, slice_training, tiny_model
from lape_kernels.testing import random_neurons as _random_neurons
from lape_kernels.training import trainable_parameters

H, I = 64, 128


def make_model(family: str, seed: int = 0) -> nn.Module:
    return tiny_model(family, seed=seed, num_layers=2, intermediate=I)


def random_neurons(num_layers: int = 2, k=(5, 3), seed: int = 0, intermediate: int = I):
    return _random_neurons(num_layers, intermediate, k[:num_layers], seed)


def live_neurons(model: nn.Module, k=(6, 4), seed: int = 0):
    """Random neurons among those whose weights get a clear gradient on the test batch.

    The tiny models have "dead" neurons (act(gate) ~ 0 everywhere, gradients ~1e-10): there
    AdamW's update is g / (|g| + eps) of pure float noise, so two exact implementations
    legitimately disagree. LAPE-selected neurons are active ones, so exclude the dead ones.
    """
    probe = copy.deepcopy(model)
    ids, labels = batch(seed=0)
    probe(ids, labels=labels).loss.backward()
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer, n in zip(probe.model.layers, k):
        mlp = layer.mlp
        if hasattr(mlp, "gate_up_proj"):
            gg, gu = mlp.gate_up_proj.weight.grad.chunk(2, 0)
        else:
            gg, gu = mlp.gate_proj.weight.grad, mlp.up_proj.weight.grad
        gd = mlp.down_proj.weight.grad.t()
        score = torch.stack([t.abs().min(1).values / t.abs().max() for t in (gg, gu, gd)]).min(0).values
        live = torch.nonzero(score > 1e-4).flatten()
        assert live.numel() >= n, "not enough live neurons in the tiny model"
        out.append(live[torch.randperm(live.numel(), generator=g)[:n]].sort().values)
    return out


def batch(b: int = 2, s: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(3, 256, (b, s), generator=g)
    labels = ids.clone()
    labels[0, :2] = -100  # some ignored positions
    return ids, labels


# ----------------------------------------------------------------------------- the oracle


def make_oracle(model: nn.Module, neurons):
    """An UNPATCHED copy of ``model`` where only the selected rows/cols are trained, through dense
    weights (the paper's slice training). Returns (oracle, slice params in the order of
    ``trainable_parameters``)."""
    oracle = copy.deepcopy(model)
    if patching.is_patched(oracle):
        lape_kernels.unpatch(oracle)
    return oracle, slice_training(oracle, neurons)


def mlp_weights(model: nn.Module):
    out = []
    for layer in model.model.layers:
        mlp = layer.mlp
        if hasattr(mlp, "gate_up_proj"):
            out += [mlp.gate_up_proj.weight.detach().clone(), mlp.down_proj.weight.detach().clone()]
        else:
            out += [mlp.gate_proj.weight.detach().clone(), mlp.up_proj.weight.detach().clone(),
                    mlp.down_proj.weight.detach().clone()]
    return out


def train_steps(model, params, steps: int = 5, lr: float = 1e-2):
    ids, labels = batch(seed=0)  # the same batch: the loss must go down
    return adamw_steps(model, params, ids, labels, steps=steps, lr=lr)


# ----------------------------------------------------------------------------- (1) setup


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_trainable_count_and_same_outputs(family):
    model = make_model(family)
    ids, labels = batch()
    with torch.no_grad():
        want_logits = model(ids).logits
        want_loss = model(ids, labels=labels).loss
    neurons = random_neurons(k=(5, 3))
    lape_kernels.patch(model, neurons=neurons)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 3 * H * 8
    assert {id(p) for p in trainable} == {id(p) for p in trainable_parameters(model)}
    mlp0 = model.model.layers[0].mlp
    assert mlp0.lape_gate_rows.shape == (5, H) and mlp0.lape_down_cols.shape == (H, 5)
    assert torch.equal(mlp0.lape_neuron_index, neurons[0])
    with torch.no_grad():
        got_logits = model(ids).logits
        got = model(ids, labels=labels)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got.logits is None


def test_layers_without_neurons_get_nothing():
    model = make_model("llama")
    lape_kernels.patch(model, neurons=[torch.tensor([3, 1]), torch.zeros(0, dtype=torch.long)])
    m0, m1 = (layer.mlp for layer in model.model.layers)
    assert torch.equal(m0.lape_neuron_index, torch.tensor([1, 3]))  # sorted
    assert not hasattr(m1, "lape_gate_rows") and m1._lape.sparse is None
    ids, labels = batch()
    model(ids, labels=labels).loss.backward()
    assert m0.lape_gate_rows.grad is not None and m0.lape_gate_rows.grad.abs().sum() > 0


def test_clear_restores_requires_grad_flags():
    model = make_model("qwen2")
    model.model.embed_tokens.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    lape_kernels.patch(model, neurons=random_neurons())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lape_" not in n)
    # re-selecting replaces the selection and keeps the ORIGINAL flags
    lape_kernels.patch(model, neurons=random_neurons(k=(2, 2), seed=1))
    assert sum(p.numel() for p in trainable_parameters(model)) == 3 * H * 4
    lape_kernels.unpatch(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    sparse_mlp.clear_trainable_neurons(model)  # no-op when nothing is set


def test_neuron_set_input():
    from lape_kernels.neurons import NeuronSet

    ns = NeuronSet({"mt": random_neurons(), "en": random_neurons(seed=3)}, num_layers=2, intermediate_size=I)
    model = make_model("gemma")
    lape_kernels.patch(model, neurons=ns, language="en")
    assert torch.equal(model.model.layers[0].mlp.lape_neuron_index, ns["en"][0])
    assert model._lape_sparse["language"] == "en"
    with pytest.raises(ValueError, match="language="):
        lape_kernels.patch(make_model("gemma"), neurons=ns)
    with pytest.raises(KeyError, match="xx"):
        lape_kernels.patch(make_model("gemma"), neurons=ns, language="xx")
    bad = NeuronSet({"mt": random_neurons(num_layers=1, k=(2,))}, num_layers=1, intermediate_size=I)
    with pytest.raises(ValueError, match="layer"):
        lape_kernels.patch(make_model("gemma"), neurons=bad, language="mt")


@pytest.mark.parametrize(
    "neurons, exc, match",
    [
        ([torch.tensor([1])], ValueError, "1 layers, the model has 2"),
        ([torch.tensor([1]), torch.tensor([128])], ValueError, r"index 128 out of range \[0, 128\)"),
        ([torch.tensor([-1]), torch.tensor([1])], ValueError, "index -1 out of range"),
        ([torch.tensor([4, 2, 4]), torch.tensor([1])], ValueError, "duplicate index 4"),
        ([torch.tensor([1.0]), torch.tensor([1])], TypeError, "int64"),
        ([torch.tensor([1], dtype=torch.int32), torch.tensor([1])], TypeError, "int64"),
        ([torch.tensor([[1]]), torch.tensor([1])], ValueError, "1-D"),
        ([[1, 2], torch.tensor([1])], TypeError, "torch.Tensor"),
        (torch.tensor([1, 2]), TypeError, "per-layer list"),
        ([torch.zeros(0, dtype=torch.int64)] * 2, ValueError, "selects no neuron in any layer"),
    ],
)
def test_bad_neurons(neurons, exc, match):
    model = make_model("llama")
    with pytest.raises(exc, match=match):
        lape_kernels.patch(model, neurons=neurons)
    # a failed selection leaves no trainable slices behind
    assert not sparse_mlp.has_trainable_neurons(model)


def test_unfrozen_base_weights_are_rejected():
    model = make_model("llama")
    lape_kernels.patch(model, neurons=random_neurons())
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="base weights require grad"):
        model(batch()[0])


# ----------------------------------------------------------------------------- (2) exactness


@pytest.mark.parametrize("family", FAMILIES)
def test_training_matches_paper_method(family):
    """5 AdamW steps (wd 0.01, clip 1.0, lr 1e-2): same losses and merged weights as dense
    clone-and-scatter training of only the selected slices."""
    base = make_model(family)
    before = mlp_weights(base)
    neurons = live_neurons(base, k=(6, 4), seed=2)
    oracle, oracle_params = make_oracle(base, neurons)
    ours = copy.deepcopy(base)
    lape_kernels.patch(ours, neurons=neurons)
    ours.train(), oracle.train()
    want = train_steps(oracle, oracle_params)
    got = train_steps(ours, trainable_parameters(ours))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)
    assert got[-1] < got[0] - 0.05  # training really changed something
    bake_slice_training(oracle)
    # base weights were never touched by training
    for a, b in zip(mlp_weights(ours), before):
        assert torch.equal(a, b)
    lape_kernels.merge(ours)
    changed = 0
    for a, b, c in zip(mlp_weights(ours), mlp_weights(oracle), before):
        # fp32 summation order differs (4 small matmuls vs 2 dense ones); a real error is ~lr = 1e-2
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        changed += int((a != c).sum())
    assert changed > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_training_is_bit_identical_to_slice_training(family):
    """A bf16 model: the sparse MLP keeps the unpatched model's rounding points (the HF-exact ops;
    the base and slice parts of y and of dx summed in fp32 and rounded once, as one GEMM over the
    spliced weight does), so 5 AdamW steps give the paper's slice training's losses bit for bit,
    and its merged weights but where two GEMMs' fp32 summation orders round to neighbouring bf16
    values (measured: gemma2, 1 of the 49,152 merged MLP weights one ulp apart; the others bit
    for bit).
    (The chunked LM loss sums differently; tests/training/test_loss.py covers it.)"""
    base = make_model(family).to(torch.bfloat16)
    neurons = live_neurons(base, k=(6, 4), seed=2)
    oracle, oracle_params = make_oracle(base, neurons)
    ours = copy.deepcopy(base)
    lape_kernels.patch(ours, neurons=neurons, chunked_loss=False)
    ours.train(), oracle.train()
    want = train_steps(oracle, oracle_params)
    got = train_steps(ours, trainable_parameters(ours))
    assert got == want and got[-1] < got[0] - 0.05
    bake_slice_training(oracle)
    lape_kernels.merge(ours)
    ulp = torch.finfo(torch.bfloat16).eps
    differ = total = 0
    for a, b in zip(mlp_weights(ours), mlp_weights(oracle)):
        bad = a != b
        differ, total = differ + int(bad.sum()), total + a.numel()
        assert bool(((a - b).abs() <= ulp * torch.maximum(a.abs(), b.abs()))[bad].all())
    assert differ <= 1e-4 * total


# ----------------------------------------------------------------------------- (3) memory


def _spy_step(model, ids, labels):
    known = {p.untyped_storage().data_ptr() for p in model.parameters()}
    known |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    spy = WeightShapeSpy([(I, H), (H, I), (2 * I, H)], I * H, known)
    with spy:
        model(ids, labels=labels).loss.backward()
    return spy.hits


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2", "qwen3"])
def test_no_weight_shaped_tensor_is_created(family):
    model = make_model(family)
    ids, labels = batch(b=2, s=7)  # 14 tokens: no activation can share a weight's shape
    lape_kernels.patch(model, neurons=random_neurons())
    model.train()
    hits = _spy_step(model, ids, labels)
    assert hits == []
    for n, p in model.named_parameters():
        assert (p.grad is not None) == ("lape_" in n), n


def test_spy_catches_the_dense_method():
    """The detector is not vacuous: the paper's clone-and-scatter does create weight tensors."""
    model = make_model("llama")
    ids, labels = batch(b=2, s=7)
    oracle, _ = make_oracle(model, random_neurons())
    hits = _spy_step(oracle, ids, labels)
    assert any(shape == (I, H) for _, shape in hits)


@pytest.mark.parametrize("recompute, kept", [("none", 2), ("up", 1), ("gate_up", 0)])
def test_saves_only_x_and_what_is_not_recomputed(recompute, kept):
    """What the sparse MLP keeps for backward: x [T,H], plus gate and up [T,I] unless recompute=
    drops them (never h, never a weight)."""
    model = make_model("llama")
    lape_kernels.patch(model, neurons=random_neurons(), recompute=recompute)
    mlp = model.model.layers[1].mlp
    x = torch.randn(14, H, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sparse_mlp.sparse_mlp_forward(mlp, x)
    params = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    new = sorted(tuple(t.shape) for t in saved if t.data_ptr() not in params)
    assert new == [(14, H)] + [(14, I)] * kept


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3_text"])
def test_recompute_gives_bitwise_equal_training(family):
    """Recomputing gate/up in backward repeats the forward's ops: identical grads, steps, losses."""
    base = make_model(family)
    neurons = live_neurons(base)
    ids, labels = batch()
    runs = {}
    for mode in sparse_mlp.RECOMPUTE_MODES:
        model = copy.deepcopy(base)
        lape_kernels.patch(model, neurons=neurons, recompute=mode)
        opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2, weight_decay=0.1)
        losses = []
        for _ in range(3):
            loss = model(ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        runs[mode] = (losses, [p.detach().clone() for p in trainable_parameters(model)])
    want_losses, want_params = runs["none"]
    for mode in ("up", "gate_up"):
        losses, params = runs[mode]
        assert all(torch.equal(a, b) for a, b in zip(losses, want_losses)), mode
        assert all(torch.equal(a, b) for a, b in zip(params, want_params)), mode


def test_recompute_under_autocast_matches_kept():
    model = make_model("qwen2")
    lape_kernels.patch(model, neurons=random_neurons())
    ids, labels = batch()
    got = {}
    for mode in ("none", "gate_up"):
        lape_kernels.patch(model, recompute=mode)  # switches mode, keeps the slices
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=labels).loss
        loss.backward()
        got[mode] = _grads(model)
    for a, b in zip(got["gate_up"], got["none"]):
        assert torch.equal(a, b)


def test_recompute_switch_keeps_trained_values():
    model = make_model("llama")
    lape_kernels.patch(model, neurons=random_neurons())
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(1.0)
    before = [p.detach().clone() for p in trainable_parameters(model)]
    lape_kernels.patch(model, recompute="up")
    assert all(m._lape.sparse.recompute == "up" for m in patching.patched_mlps(model) if m._lape.sparse)
    assert all(torch.equal(a, b) for a, b in zip(trainable_parameters(model), before))


def test_recompute_bad_values():
    model = make_model("llama")
    with pytest.raises(ValueError, match="recompute must be one of"):
        lape_kernels.patch(model, neurons=random_neurons(), recompute="down")
    assert not patching.is_patched(model)
    with pytest.raises(ValueError, match="recompute applies to sparse neuron training"):
        lape_kernels.patch(model, recompute="up")
    assert not patching.is_patched(model)
    lape_kernels.patch(model)
    with pytest.raises(RuntimeError, match="recompute applies to sparse neuron training"):
        sparse_mlp.set_recompute(model, "up")


def test_selection_is_checked_once_when_installed(monkeypatch):
    """The slot map of each layer's neurons is built (and the index checked) when the neurons are
    installed; every split op of a training step gets it, so GPU kernels neither re-check the
    index (a device-to-host sync) nor rebuild the map per call."""
    from lape_kernels.kernels import ops

    built = []
    real = ops.sel_slots
    monkeypatch.setattr(ops, "sel_slots", lambda *a: built.append(a[1]) or real(*a))
    model = make_model("llama")
    lape_kernels.patch(model, neurons=random_neurons())
    assert built == [I, I]  # once per layer with neurons
    slots = {layer.mlp.lape_neuron_slots.data_ptr() for layer in model.model.layers}

    class Spy(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if "lape_kernels" in name and "split" in name:
                self.seen.append(args[4 if "act_mul_split" in name else 6])
            return func(*args, **(kwargs or {}))

    ids, labels = batch()
    with Spy() as spy:
        model(ids, labels=labels).loss.backward()
    assert len(spy.seen) == 4 and all(t is not None and t.data_ptr() in slots for t in spy.seen)
    assert built == [I, I]


# ----------------------------------------------------------------------------- (4) training features


def _grads(model):
    return [p.grad.detach().clone() for p in trainable_parameters(model)]


def test_gradient_accumulation_equals_big_batch():
    model = make_model("mistral")
    lape_kernels.patch(model, neurons=random_neurons())
    ids = torch.randint(3, 256, (4, 9), generator=torch.Generator().manual_seed(5))
    model(ids, labels=ids).loss.backward()
    big = _grads(model)
    model.zero_grad(set_to_none=True)
    for part in ids.chunk(2):
        (model(part, labels=part).loss / 2).backward()
    for a, b in zip(_grads(model), big):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_same_grads(reentrant):
    model = make_model("gemma3_text")
    lape_kernels.patch(model, neurons=random_neurons())
    model.train()
    ids, labels = batch()
    model(ids, labels=labels).loss.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:  # as with PEFT: reentrant checkpointing needs an input that requires grad
            model.enable_input_require_grads()
        model(ids, labels=labels).loss.backward()
    got = _grads(model)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_autocast_bf16(family):
    model = make_model(family)
    lape_kernels.patch(model, neurons=random_neurons())
    ids, labels = batch()
    loss32 = model(ids, labels=labels).loss
    loss32.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = model(ids, labels=labels).loss
    loss16.backward()
    got = _grads(model)
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=0)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        rel = (a - b).norm() / b.norm()
        assert rel < 0.05, rel


def test_bf16_model_with_fp32_master_slices():
    """A bf16 model whose trainable slices are fp32 (cast to bf16 for compute) trains."""
    model = make_model("qwen3").to(torch.bfloat16)
    lape_kernels.patch(model, neurons=random_neurons())
    for p in trainable_parameters(model):
        p.data = p.data.float()
    ids, labels = batch()
    loss = model(ids, labels=labels).loss
    loss.backward()
    for p in trainable_parameters(model):
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_torch_compile_aot_eager_matches_eager():
    torch._dynamo.reset()
    model = make_model("llama")
    lape_kernels.patch(model, neurons=random_neurons())
    model.train()
    ids, labels = batch()
    loss = model(ids, labels=labels).loss
    loss.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)

    def step(ids, labels):
        out = model(ids, labels=labels).loss
        out.backward()
        return out

    compiled = torch.compile(step, backend="aot_eager")
    got_loss = compiled(ids, labels)
    torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(model), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_dx_for_frozen_input():
    """Layer 0's input needs no gradient: the backward skips dx entirely."""
    model = make_model("llama")
    lape_kernels.patch(model, neurons=random_neurons())
    mlp = model.model.layers[0].mlp
    x = torch.randn(5, H)
    y = sparse_mlp.sparse_mlp_forward(mlp, x)
    y.sum().backward()
    assert x.grad is None and mlp.lape_down_cols.grad is not None


@pytest.mark.parametrize("recompute", sparse_mlp.RECOMPUTE_MODES)
@pytest.mark.parametrize("backend", ["ops", "reference"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
def test_sparse_function_grads_vs_dense_autograd(activation, backend, recompute, monkeypatch):
    """The autograd.Function against dense autograd on the spliced weights (with biases)."""
    import importlib

    from lape_kernels.training import _sparse_math

    monkeypatch.setattr(_sparse_math, "_kernel_ops", importlib.import_module(f"lape_kernels.kernels.{backend}"))
    g = torch.Generator().manual_seed(0)
    T, k = 9, 4
    x = torch.randn(T, H, generator=g).requires_grad_()
    wg, wu = torch.randn(I, H, generator=g) / 8, torch.randn(I, H, generator=g) / 8
    wd = torch.randn(H, I, generator=g) / 11
    bg, bu, bd = (torch.randn(n, generator=g) for n in (I, I, H))
    sel = torch.tensor([0, 7, 8, 127])
    pg, pu, pd = (torch.randn(*s, generator=g).requires_grad_() for s in ((k, H), (k, H), (H, k)))
    dy = torch.randn(T, H, generator=g)

    y = sparse_mlp._function_for("cpu").apply(x, wg, wu, wd, bg, bu, bd, pg, pu, pd, sel, activation, recompute)
    got = torch.autograd.grad(y, (x, pg, pu, pd), dy)

    act = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu}[activation]
    Wg, Wu, Wd = wg.index_copy(0, sel, pg), wu.index_copy(0, sel, pu), wd.index_copy(1, sel, pd)
    y_ref = F.linear(act(F.linear(x, Wg, bg)) * F.linear(x, Wu, bu), Wd, bd)
    want = torch.autograd.grad(y_ref, (x, pg, pu, pd), dy)
    for a, b in zip((y, *got), (y_ref, *want)):
        assert ((a - b).norm() / b.norm()).item() < 1e-6


@pytest.mark.parametrize("family, recompute", [("llama", "none"), ("phi3", "none"), ("llama", "gate_up")])
def test_sparse_mlp_compiles_fullgraph(family, recompute):
    """dynamo traces the autograd.Function and the custom ops without graph breaks."""
    torch._dynamo.reset()
    model = make_model(family)
    lape_kernels.patch(model, neurons=random_neurons(), recompute=recompute)
    mlp = model.model.layers[1].mlp
    x = torch.randn(6, H, requires_grad=True)
    compiled = torch.compile(lambda t: sparse_mlp.sparse_mlp_forward(mlp, t), backend="aot_eager", fullgraph=True)
    y = compiled(x)
    gx, gp = torch.autograd.grad(y.square().sum(), (x, mlp.lape_gate_rows))
    y_ref = sparse_mlp.sparse_mlp_forward(mlp, x)
    rx, rp = torch.autograd.grad(y_ref.square().sum(), (x, mlp.lape_gate_rows))
    assert torch.equal(y, y_ref) and torch.equal(gx, rx) and torch.equal(gp, rp)
