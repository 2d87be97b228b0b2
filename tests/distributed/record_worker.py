"""Run by ``torchrun`` (tests/distributed/test_collect_library.py): for each case, ``record()``
on this rank's share of a fixed batch, with the model bare, under DDP or under FSDP2, then
``stats.all_reduce()``; rank 0 saves the global statistics as OUT_DIR/FAMILY-WRAPPER.

    torchrun --standalone --nproc_per_node 2 record_worker.py OUT_DIR FAMILY:WRAPPER ...
"""
import os
import sys

import torch

import lape_kernels as lk
from lape_kernels import distributed
from lape_kernels.testing import random_batch, tiny_model

LANGS = ["aa", "bb"]


def batch():
    """8 sequences with padding and per-sequence languages (row i: language i % 2)."""
    ids, mask = random_batch(batch=8, seq=12, seed=5, padding="right")
    return ids, mask, torch.arange(8) % 2


def main(out_dir: str, cases) -> None:
    torch.set_num_threads(1)
    with distributed.launched(torch.device("cpu")) as launch:
        assert launch is not None and launch.backend == "gloo"
        for case in cases:
            family, wrapper = case.split(":")
            one_case(family, wrapper, out_dir)
    sys.stderr.flush()
    os._exit(0)  # FSDP2 over gloo may abort at interpreter exit (see tests/training/test_distributed.py)


def one_case(family: str, wrapper: str, out_dir: str) -> None:
    model = tiny_model(family, num_layers=2)
    wrapped = model
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model)
    elif wrapper == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    ids, mask, langs = batch()
    mine = slice(distributed.rank(), None, distributed.world_size())  # a disjoint share: rows r, r+W, ...
    with torch.no_grad(), lk.record(wrapped, languages=LANGS) as stats:
        stats.set_batch_languages(langs[mine])
        wrapped(input_ids=ids[mine], attention_mask=mask[mine])
    total = stats.all_reduce()
    single = stats["bb"].all_reduce()  # ActivationStats.all_reduce: the same numbers for one language
    assert single.equal(total["bb"]) and single.meta["world_size"] == distributed.world_size()
    if distributed.is_main():
        total.save(os.path.join(out_dir, f"{family}-{wrapper}"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
