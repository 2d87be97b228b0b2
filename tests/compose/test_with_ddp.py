"""DDP and FSDP2 wrappers, in one process (a world-size-1 gloo group): record, patch, merge and
save see through DDP; adding the trainable slices after a distributed wrapper registered the
parameters is refused (they would not be synchronised). Two-process training of a model patched
before wrapping: tests/training/test_distributed.py."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import lape_kernels as lk
from lape_kernels.testing import hook_counts, random_batch, random_neurons, tiny_model

NEURONS = random_neurons(2, 128, 3, seed=4)


@pytest.fixture
def group(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_record_and_patch_see_through_ddp(group, tmp_path):
    ids, mask = random_batch(padding="left")
    model = tiny_model("llama", num_layers=2)
    ddp = DDP(model)
    want = hook_counts(model, ids, mask)
    with torch.no_grad(), lk.record(ddp) as stats:  # was: cannot patch model_type None
        ddp(input_ids=ids, attention_mask=mask)
    assert torch.equal(stats.over_zero, want["over_zero"][0]) and stats.n_tokens == int(mask.sum())

    loss = ddp(input_ids=ids, labels=ids).loss
    assert lk.patch(ddp) is ddp and lk.is_patched(ddp) and lk.is_patched(model)
    torch.testing.assert_close(ddp(input_ids=ids, labels=ids).loss, loss, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        plain = ddp(input_ids=ids).logits
        with lk.deactivate(ddp, NEURONS):
            assert not torch.equal(ddp(input_ids=ids).logits, plain)
        assert torch.equal(ddp(input_ids=ids).logits, plain)

    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match=r"wrapped by DistributedDataParallel.*patch\(model, neurons=\.\.\.\).*then wrap"):
        lk.patch(ddp, neurons=NEURONS)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before and lk.is_patched(model)
    assert lk.unpatch(ddp) is ddp and not lk.is_patched(model)


def test_train_patched_model_under_ddp_then_merge_and_save(group, tmp_path):
    ids, _ = random_batch()
    model = lk.patch(tiny_model("phi3", num_layers=2), neurons=random_neurons(2, 96, 3)).train()
    ddp = DDP(model)
    opt = torch.optim.SGD(lk.trainable_parameters(ddp), lr=0.5)
    ddp(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert lk.save_neurons(ddp, tmp_path / "n").is_dir()
    with pytest.raises(RuntimeError, match="wrapped by DistributedDataParallel"):
        lk.load_neurons(DDP(tiny_model("phi3", num_layers=2)), tmp_path / "n")
    model.eval()
    with torch.no_grad():
        trained = ddp(input_ids=ids).logits
    assert lk.merge(ddp) is ddp and not lk.is_patched(model) and "forward" not in model.__dict__
    with torch.no_grad():
        torch.testing.assert_close(ddp(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)


def test_fully_shard_model_records_and_refuses_new_parameters(group):
    from torch.distributed.fsdp import fully_shard

    ids, mask = random_batch(padding="right")
    plain = tiny_model("llama", num_layers=2)
    want = hook_counts(plain, ids, mask)
    model = tiny_model("llama", num_layers=2)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    with torch.no_grad(), lk.record(model) as stats:
        model(input_ids=ids, attention_mask=mask)
    assert torch.equal(stats.over_zero, want["over_zero"][0]) and stats.n_tokens == int(mask.sum())
    with pytest.raises(RuntimeError, match=r"wrapped by fully_shard \(FSDP2\)"):
        lk.patch(model, neurons=NEURONS)
    assert not lk.is_patched(model)
    with torch.no_grad():
        want_loss = plain(input_ids=ids, labels=ids).loss
        assert lk.patch(model) is model
        torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, want_loss, rtol=1e-6, atol=1e-6)
        with lk.deactivate(model, NEURONS):
            assert not torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    lk.unpatch(model)
