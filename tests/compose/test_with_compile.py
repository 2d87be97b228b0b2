"""torch.compile and lape_kernels: record() blocks over a compiled patched model compile once
(nothing of a block is in dynamo's guards), counts stay exact, and the patched forward has no
graph break."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import lape_kernels as lk
from lape_kernels.testing import hook_counts, random_batch, random_neurons, tiny_model

#: more blocks than dynamo's recompile limit (8): before, every block recompiled and the 9th
#: ran eagerly
BLOCKS = 10


@pytest.fixture
def dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def test_record_blocks_compile_once_with_exact_counts(dynamo):
    model = lk.patch(tiny_model("llama", num_layers=2), chunked_loss=False)
    ids, mask = random_batch(batch=3, seq=10, seed=17, padding="left")
    want = hook_counts(model, ids, mask)
    compiled = torch.compile(model, backend="aot_eager")  # functionalizes the accumulators' add_
    with torch.no_grad():
        compiled(input_ids=ids, attention_mask=mask)  # outside a block: its own graph
    graphs = []
    for block in range(BLOCKS):
        with torch.no_grad(), lk.record(compiled) as stats:  # the OptimizedModule is seen through
            compiled(input_ids=ids, attention_mask=mask)
        assert torch.equal(stats.over_zero, want["over_zero"][0]), block
        assert stats.n_tokens == int(mask.sum())
        torch.testing.assert_close(stats.act_sum, want["act_sum"][0], rtol=1e-5, atol=1e-5)
        graphs.append(dynamo["stats"]["unique_graphs"])
    assert graphs[1:] == [graphs[0]] * (BLOCKS - 1)  # the first block compiled; no block after it did
    assert not dynamo["graph_break"]
    with torch.no_grad():
        compiled(input_ids=ids, attention_mask=mask)
    assert dynamo["stats"]["unique_graphs"] == graphs[0]


def test_patched_forward_record_and_sparse_training_have_no_graph_break(dynamo):
    ids, mask = random_batch(batch=2, seq=8, seed=3, padding="right")
    model = lk.patch(tiny_model("qwen3", num_layers=1), chunked_loss=False)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    want = hook_counts(model, ids, mask)
    with torch.no_grad(), lk.record(model) as stats:
        compiled(input_ids=ids, attention_mask=mask)
    assert torch.equal(stats.over_zero, want["over_zero"][0])

    trained = lk.patch(tiny_model("qwen3", num_layers=1), neurons=random_neurons(1, 128, 4)).train()
    compiled = torch.compile(trained, backend="aot_eager", fullgraph=True)
    loss = compiled(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for p in lk.trainable_parameters(compiled))
