"""HF-exact numerics end to end: a patched model computes, bit for bit, what the unpatched Hugging
Face model computes, for every supported family in fp32, bf16 and fp16 (logits torch.equal), and
``record()`` counts what a forward hook on the model's own activation module sees. Shapes with
remainders in ATen's vector steps (an intermediate size that is no multiple of any vector width,
odd token counts) and two threads are included: the kernels take ATen's scalar function exactly
where ATen does."""
from __future__ import annotations

import pytest
import torch

import lape_kernels
from lape_kernels.stats import record

from lape_kernels.testing import TINY_FAMILIES as FAMILIES
from lape_kernels.testing import hook_counts, random_batch, tiny_model

from helpers import MODEL_DTYPES as DTYPES


def _forward(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_is_the_hf_model_bit_for_bit(family, dtype, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # intermediate 100 (Phi-3: the halves of a 200-wide fused projection): ATen's scalar tails
        model = tiny_model(family, dtype=DTYPES[dtype], intermediate=100, num_layers=2)
        ids, mask = random_batch(batch=3, seq=11, seed=5, padding="left")
        expected = _forward(model, ids, mask)
        lape_kernels.patch(model)
        assert torch.equal(_forward(model, ids, mask), expected)
        lape_kernels.unpatch(model)
        ref = hook_counts(model, ids, mask)
        with torch.no_grad(), record(model) as stats:
            logits = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(logits, expected)
        assert torch.equal(stats.over_zero, ref["over_zero"][0]) and stats.n_tokens == int(ref["n_tokens"][0])
        assert int(stats.over_zero.sum()) > 0
        torch.testing.assert_close(stats.act_sum, ref["act_sum"][0], rtol=1e-9, atol=1e-9)  # fp64 order only
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_patched_model_under_autocast(dtype):
    """Autocast runs the MLP in the autocast dtype: the patched model still computes HF's bits."""
    model = tiny_model("llama", intermediate=100)
    ids, mask = random_batch(batch=2, seq=9, seed=1, padding="right")
    with torch.autocast("cpu", dtype=DTYPES[dtype]):
        expected = _forward(model, ids, mask)
        lape_kernels.patch(model)
        got = _forward(model, ids, mask)
    assert torch.equal(got, expected)
