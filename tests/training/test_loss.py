"""Chunked LM-head + cross-entropy: equal to HF's causal-LM loss (values and gradients), never
materialising the full [tokens, vocab] logits."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers.loss.loss_utils import ForCausalLMLoss

import lape_kernels
from lape_kernels.training.loss import (
    chunked_causal_lm_loss,
    default_chunk_size,
    default_tiles,
    has_chunked_loss,
    install_chunked_loss,
    uninstall_chunked_loss,
)

from lape_kernels.testing import tiny_model


def hf_loss(hidden, lm_head, labels, softcap=None, **kw):
    logits = lm_head(hidden)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return ForCausalLMLoss(logits, labels, lm_head.weight.shape[0], **kw)


def make_case(B=2, S=9, H=16, V=50, bias=False, seed=0, ignore_frac=0.3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, H, generator=g).to(dtype).requires_grad_()
    head = nn.Linear(H, V, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g) / H**0.5)
        if bias:
            head.bias.copy_(torch.randn(V, generator=g))
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[torch.rand(B, S, generator=g) < ignore_frac] = -100
    return hidden, head, labels


def grads(loss, hidden, head):
    params = [hidden, head.weight] + ([head.bias] if head.bias is not None else [])
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("chunk", [1, 4, 5, 17, 18, 1000, None])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_hf_loss_and_grads(chunk, softcap, bias):
    hidden, head, labels = make_case(bias=bias)
    want = hf_loss(hidden, head, labels, softcap)
    got = chunked_causal_lm_loss(hidden, head, labels, softcap=softcap, chunk_size=chunk)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads(got, hidden, head), grads(want, hidden, head)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("num_items", [7, torch.tensor(11)])
def test_num_items_in_batch(num_items):
    hidden, head, labels = make_case()
    want = hf_loss(hidden, head, labels, num_items_in_batch=num_items)
    got = chunked_causal_lm_loss(hidden, head, labels, num_items_in_batch=num_items, chunk_size=4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads(got, hidden, head), grads(want, hidden, head)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_shift_labels_and_ignore_index():
    hidden, head, labels = make_case()
    shift = torch.roll(labels, 3, dims=1)
    want = hf_loss(hidden, head, None, shift_labels=shift)
    got = chunked_causal_lm_loss(hidden, head, None, shift_labels=shift, chunk_size=5)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    other = labels.masked_fill(labels == -100, 7)
    want = hf_loss(hidden, head, other, ignore_index=7)
    got = chunked_causal_lm_loss(hidden, head, other, ignore_index=7, chunk_size=5)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_bf16_close_to_hf():
    hidden, head, labels = make_case(dtype=torch.bfloat16, V=300)
    want = hf_loss(hidden, head, labels, 5.0)
    got = chunked_causal_lm_loss(hidden, head, labels, softcap=5.0, chunk_size=3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    for a, b in zip(grads(got, hidden, head), grads(want, hidden, head)):
        assert a.dtype == b.dtype == torch.bfloat16
        assert ((a.float() - b.float()).norm() / b.float().norm()) < 2e-2


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3), S=st.integers(1, 12), V=st.integers(2, 40), chunk=st.integers(1, 40),
    ignore_frac=st.floats(0.0, 0.9), seed=st.integers(0, 2**16),
)
def test_property_equals_hf(B, S, V, chunk, ignore_frac, seed):
    hidden, head, labels = make_case(B=B, S=S, V=V, H=8, seed=seed, ignore_frac=ignore_frac)
    if S > 1:
        labels[0, 1] = 1  # at least one target survives the shift (else HF's mean is 0/0)
    want = hf_loss(hidden, head, labels)
    got = chunked_causal_lm_loss(hidden, head, labels, chunk_size=chunk)
    if S == 1:  # every target is ignored: HF's mean is 0/0
        assert torch.isnan(want) and torch.isnan(got)
        return
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(got, hidden, head), grads(want, hidden, head)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


class _BigTensorSpy(TorchDispatchMode):
    """Tensors bigger than ``rows_limit`` rows of logits that are not views of ``known``."""

    def __init__(self, rows_limit, vocab, known):
        super().__init__()
        self.rows_limit, self.vocab, self.hits = rows_limit, vocab, []
        self.known = {t.untyped_storage().data_ptr() for t in known}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.numel() > self.rows_limit * self.vocab
                    and t.untyped_storage().data_ptr() not in self.known):
                self.hits.append((str(func), tuple(t.shape)))
        return out


def test_never_materialises_full_logits():
    hidden, head, labels = make_case(B=2, S=16, H=8, V=500)
    head.weight.requires_grad_(False)
    spy = _BigTensorSpy(rows_limit=4, vocab=500, known=[head.weight, hidden])
    with spy:
        loss = chunked_causal_lm_loss(hidden, head, labels, chunk_size=4)
        loss.backward()
    assert spy.hits == []
    spy = _BigTensorSpy(rows_limit=4, vocab=500, known=[head.weight, hidden])
    with spy:
        hf_loss(hidden, head, labels).backward()
    assert spy.hits  # the spy does see HF's full logits


def test_no_gradient_work_under_no_grad():
    """Evaluation (no_grad) computes the loss only: no gradient buffers, not even for a
    trainable lm_head."""
    hidden, head, labels = make_case(B=2, S=16, H=8, V=500)
    want = hf_loss(hidden, head, labels).detach()
    spy = _BigTensorSpy(rows_limit=4, vocab=500, known=[head.weight, hidden])
    spy.rows_limit = 0  # flag anything with >= vocab elements, i.e. a weight-sized gradient
    with spy, torch.no_grad():
        got = chunked_causal_lm_loss(hidden, head, labels, chunk_size=4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert [s for _, s in spy.hits if s == tuple(head.weight.shape)] == []
    small = [s for _, s in spy.hits if s == (32, 8)]  # grad_h would be [tokens, H]
    assert small == []


def test_default_chunk_size():
    assert default_chunk_size(100, 50) == 100
    assert default_chunk_size(100, 1 << 20) == 64  # never below 64 tokens (GEMM efficiency)
    assert default_chunk_size(40, 1 << 20) == 40  # ... nor above the tokens there are
    assert default_chunk_size(100000, 262144) == 64
    assert default_chunk_size(100000, 128256) == 64
    assert default_chunk_size(100000, 16384) == 256
    c = default_chunk_size(4096, 49152)
    assert c & (c - 1) == 0 and c * 49152 <= (1 << 22)


# ----------------------------------------------------------------------------- through the model


def _all_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_model_loss_and_grads_equal_hf(family):
    """install_chunked_loss on an unpatched, fully trainable model: the same loss and the same
    gradient for every parameter (lm_head / tied embeddings included; Gemma 2 softcaps)."""
    ref = tiny_model(family, num_layers=2)
    ours = copy.deepcopy(ref)
    install_chunked_loss(ours, chunk_size=5)
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.rand(2, 9, generator=torch.Generator().manual_seed(1)) < 0.2, -100)
    want = ref(ids, labels=labels)
    got = ours(ids, labels=labels)
    assert got.logits is None and want.logits is not None
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    want.loss.backward()
    got.loss.backward()
    gw, gg = _all_grads(ref), _all_grads(ours)
    assert gw.keys() == gg.keys() and "lm_head.weight" in gg or "model.embed_tokens.weight" in gg
    for name in gw:
        torch.testing.assert_close(gg[name], gw[name], rtol=1e-5, atol=1e-7, msg=name)


def test_softcap_is_taken_from_config():
    model = tiny_model("gemma2", num_layers=1)
    assert model.config.final_logit_softcapping
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    want = model(ids, labels=ids).loss
    install_chunked_loss(model, chunk_size=3)
    torch.testing.assert_close(model(ids, labels=ids).loss, want, rtol=1e-6, atol=1e-6)
    model.config.final_logit_softcapping = None  # and really used: without it the loss differs
    assert not torch.allclose(model(ids, labels=ids).loss, want)


def test_without_labels_runs_the_original_forward():
    model = tiny_model("qwen2", num_layers=1)
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    want = model(ids).logits
    install_chunked_loss(model)
    out = model(ids)
    assert torch.equal(out.logits, want) and out.loss is None
    out = model(ids, logits_to_keep=1)
    assert out.logits.shape == (2, 1, 256)


def test_kwargs_positional_return_dict_and_num_items():
    model = tiny_model("llama", num_layers=1)
    ref = copy.deepcopy(model)
    install_chunked_loss(model, chunk_size=4)
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    want = ref(ids, mask, labels=labels, num_items_in_batch=torch.tensor(5))
    got = model(ids, mask, labels=labels, num_items_in_batch=torch.tensor(5))
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    tup = model(ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(tup, tuple)
    torch.testing.assert_close(tup[0], ref(ids, attention_mask=mask, labels=labels).loss, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="multiple values"):
        model(ids, input_ids=ids, labels=labels)
    # Trainer inspects the signature to keep dataset columns and to pass num_items_in_batch
    params = inspect.signature(model.forward).parameters
    assert "input_ids" in params and "labels" in params
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def test_install_is_per_instance_idempotent_and_reversible():
    model = tiny_model("mistral", num_layers=1)
    other = tiny_model("mistral", num_layers=1)
    install_chunked_loss(model)
    install_chunked_loss(model, chunk_size=2)
    assert has_chunked_loss(model) and not has_chunked_loss(other)
    assert model._lape_loss_chunk_size == 2
    uninstall_chunked_loss(model)
    assert "forward" not in model.__dict__ and not hasattr(model, "_lape_loss_chunk_size")
    uninstall_chunked_loss(model)  # no-op
    body = model.model
    install_chunked_loss(body)  # a bare decoder body has no lm_head: no-op
    assert "forward" not in body.__dict__


def test_patch_installs_and_unpatch_removes():
    model = tiny_model("gemma", num_layers=1)
    lape_kernels.patch(model)
    assert has_chunked_loss(model)
    lape_kernels.unpatch(model)
    assert not has_chunked_loss(model)
    lape_kernels.patch(model, chunked_loss=False)
    assert not has_chunked_loss(model)


def test_bad_inputs():
    hidden, head, labels = make_case()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_causal_lm_loss(hidden, head, labels, chunk_size=0)
    with pytest.raises(ValueError, match="labels shape"):
        chunked_causal_lm_loss(hidden, head, labels[:, :-1])
    with pytest.raises(ValueError, match="labels or shift_labels"):
        chunked_causal_lm_loss(hidden, head, None)
    with pytest.raises(ValueError, match="chunk_size"):
        install_chunked_loss(tiny_model("llama", num_layers=1), chunk_size=-3)
    model = tiny_model("llama", num_layers=1)
    model.forward = model.forward  # someone else's instance forward
    with pytest.raises(RuntimeError, match="instance-level forward"):
        install_chunked_loss(model)


def test_compiles_fullgraph():
    torch._dynamo.reset()
    hidden, head, labels = make_case(V=64)
    compiled = torch.compile(lambda h: chunked_causal_lm_loss(h, head, labels, chunk_size=5),
                             backend="aot_eager", fullgraph=True)
    got = compiled(hidden)
    want = chunked_causal_lm_loss(hidden, head, labels, chunk_size=5)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(got, hidden)[0], torch.autograd.grad(want, hidden)[0],
                               rtol=1e-6, atol=1e-7)


def test_default_chunk_size_on_gpus_is_larger():
    assert default_chunk_size(4096, 128256, "cuda") == 256
    assert default_chunk_size(4096, 128256, "cpu") == 64


# ----------------------------------------------------------------------------- vocabulary blocks


def frozen_case(**kw):
    hidden, head, labels = make_case(**kw)
    head.requires_grad_(False)
    return hidden, head, labels


@pytest.mark.parametrize("chunk, block", [(None, None), (1, 7), (5, 16), (18, 50), (4, 1000), (None, 13)])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("bias", [False, True])
def test_vocab_blocks_equal_hf_loss_and_hidden_grad(chunk, block, softcap, bias):
    """A frozen head (sparse training, evaluation): the online logsumexp over blocks of head
    rows gives HF's loss and d(hidden)."""
    hidden, head, labels = frozen_case(bias=bias)
    want = hf_loss(hidden, head, labels, softcap)
    got = chunked_causal_lm_loss(hidden, head, labels, softcap=softcap, chunk_size=chunk, vocab_block=block)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    (gw,) = torch.autograd.grad(want, hidden)
    (gg,) = torch.autograd.grad(got, hidden)
    torch.testing.assert_close(gg, gw, rtol=1e-5, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(
    S=st.integers(2, 12), V=st.integers(2, 40), chunk=st.integers(1, 30), block=st.integers(1, 45),
    ignore_frac=st.floats(0.0, 0.9), seed=st.integers(0, 2**16), num_items=st.sampled_from([None, 7]),
)
def test_property_vocab_blocks_equal_hf(S, V, chunk, block, ignore_frac, seed, num_items):
    hidden, head, labels = frozen_case(B=2, S=S, V=V, H=8, seed=seed, ignore_frac=ignore_frac)
    labels[0, 1] = 1
    want = hf_loss(hidden, head, labels, num_items_in_batch=num_items)
    got = chunked_causal_lm_loss(hidden, head, labels, chunk_size=chunk, vocab_block=block,
                                 num_items_in_batch=num_items)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(got, hidden)[0], torch.autograd.grad(want, hidden)[0],
                               rtol=1e-4, atol=1e-6)


def test_vocab_blocks_bf16_close_to_hf():
    hidden, head, labels = frozen_case(B=2, S=16, H=32, V=300, dtype=torch.bfloat16)
    want = hf_loss(hidden, head, labels, 3.0)
    got = chunked_causal_lm_loss(hidden, head, labels, softcap=3.0, vocab_block=64)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    a, b = torch.autograd.grad(got, hidden)[0], torch.autograd.grad(want, hidden)[0]
    assert got.dtype == want.dtype and a.dtype == torch.bfloat16
    assert ((a.float() - b.float()).norm() / b.float().norm()) < 2e-2


class _HeadReads(TorchDispatchMode):
    """How many values of ``weight``'s storage entered matrix products: the head's streaming."""

    def __init__(self, weight):
        super().__init__()
        self.ptr, self.values = weight.untyped_storage().data_ptr(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            for a in args:
                if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == self.ptr:
                    self.values += a.numel()
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad", [False, True])
def test_cpu_default_streams_a_frozen_head_once(grad):
    """A 131k-row head and 256 tokens: the CPU default read the whole head once per 64-token
    chunk (4 times; twice that with d(hidden)); the vocabulary blocks read it once (twice: once
    for the logits, once for d(hidden), each block while it is in cache)."""
    V, H = 1 << 17, 8
    hidden, head, labels = frozen_case(B=1, S=256, H=H, V=V)
    hidden.requires_grad_(grad)
    assert default_chunk_size(256, V) == 64  # what the token chunks would be
    with _HeadReads(head.weight) as reads, torch.set_grad_enabled(grad):
        loss = chunked_causal_lm_loss(hidden, head, labels)
    assert reads.values == (2 if grad else 1) * V * H
    with torch.no_grad():
        want = chunked_causal_lm_loss(hidden, head, labels, chunk_size=64, vocab_block=V)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)


def test_default_tiles():
    assert default_tiles(512, 262144) == (512, 8192)
    assert default_tiles(100000, 262144) == (4096, 1024)  # at most 4096 tokens per tile
    assert default_tiles(1, 262144) == (1, 262144)
    assert default_tiles(8, 50) == (8, 50)  # never more rows than the head has
    assert default_tiles(100000, 49152)[1] >= 256


def test_model_evaluation_does_no_gradient_work_with_a_trainable_head():
    """Evaluation under no_grad of a model whose lm_head requires grad (full fine-tuning, or
    tied embeddings): no weight-sized gradient buffer, the head streamed once, the HF loss."""
    model = tiny_model("gemma2", num_layers=1)  # tied embeddings, softcap
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids, labels=ids).loss
    lape_kernels.patch(model)
    head = model.lm_head
    assert head.weight.requires_grad
    spy = _BigTensorSpy(rows_limit=0, vocab=256, known=[head.weight])
    with torch.no_grad(), spy, _HeadReads(head.weight) as reads:
        got = model(ids, labels=ids).loss
    assert [s for _, s in spy.hits if s == tuple(head.weight.shape)] == []
    assert reads.values == head.weight.numel()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_vocab_blocks_compile_fullgraph():
    torch._dynamo.reset()
    hidden, head, labels = frozen_case(V=64)
    compiled = torch.compile(lambda h: chunked_causal_lm_loss(h, head, labels, chunk_size=5, vocab_block=16),
                             backend="aot_eager", fullgraph=True)
    got = compiled(hidden)
    want = hf_loss(hidden, head, labels)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(got, hidden)[0], torch.autograd.grad(want, hidden)[0],
                               rtol=1e-5, atol=1e-7)


def test_models_whose_logits_are_not_the_head_output_keep_hf_loss():
    """Inkling divides the hidden state by ``logits_mup_width_multiplier`` before the head and
    cuts the vocabulary to ``unpadded_vocab_size``: the chunked loss does not apply (HF's loss
    stays), so patch() keeps the model's loss (it computed another one before)."""
    from lape_kernels.model_matrix import tiny_model_of_type

    model = tiny_model_of_type("inkling_text")
    assert model.config.logits_mup_width_multiplier not in (None, 1, 1.0)
    ids = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids, labels=ids).loss
        patched = lape_kernels.patch(copy.deepcopy(model))
        assert not has_chunked_loss(patched)
        assert torch.equal(patched(input_ids=ids, labels=ids).loss, want)
