"""A patched model under DDP and FSDP2 (2 CPU processes, gloo): the trainable neuron slices are
ordinary parameters, so both wrap it unchanged and train it exactly like one process does on
the whole batch."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lape_kernels.testing import tiny_model  # noqa: E402

import lape_kernels  # noqa: E402
from lape_kernels.training import trainable_parameters  # noqa: E402

WORLD = 2
STEPS = 3


def _neurons(num_layers=2, k=(6, 4)):
    g = torch.Generator().manual_seed(3)
    return [torch.randperm(128, generator=g)[:n].sort().values for n in k[:num_layers]]


def _batch():
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, 256, (4, 12), generator=g)


def _model(family):
    model = tiny_model(family, num_layers=2, intermediate=128)
    lape_kernels.patch(model, neurons=_neurons())
    return model.train()


def _train(model, params, batches):
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses


def _worker(rank, family, wrapper, out_dir):
    torch.set_num_threads(1)
    # a file rendezvous: no TCP port to race for with other jobs on the machine
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        model = _model(family)
        ids = _batch().chunk(WORLD)[rank]  # equal-size shards with equal token counts: mean of means = mean
        if wrapper == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model)
            _train(wrapped, trainable_parameters(model), [ids] * STEPS)
            state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            params = [p for p in model.parameters() if p.requires_grad]
            _train(model, params, [ids] * STEPS)
            state = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if rank == 0:
            torch.save(state, os.path.join(out_dir, "state.pt"))
        dist.barrier()  # nobody tears gloo down while the other rank still talks to it
    finally:
        dist.destroy_process_group()
    # Everything is done and saved. About 1 run in 10 (FSDP2 over gloo, torch 2.13) then dies at
    # interpreter exit with "terminate called without an active exception" (a C++ thread torn
    # down by a static destructor, after destroy_process_group returned). Leave without running
    # the destructors; a failure above still raises and reaches mp.spawn as usual.
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_wrapped_training_equals_one_process(family, wrapper, tmp_path):
    mp.spawn(_worker, args=(family, wrapper, str(tmp_path)), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "state.pt", weights_only=True)

    model = _model(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _train(model, trainable_parameters(model), [_batch()] * STEPS)  # the whole batch, one process
    want = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == set(want) and all("lape_" in n for n in want)
    for n in want:
        assert not torch.equal(want[n], before[n]), n  # training moved every slice
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5)
