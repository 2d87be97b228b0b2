"""The library side of scale-out: ``lape_kernels.distributed`` (launch from the environment, the
one-line error of a half-set one, nothing without it) and ``stats.all_reduce`` with ``record()``
on bare, DDP- and FSDP2-wrapped models in 2 processes started by torchrun (gloo, CPU)."""
from __future__ import annotations

import pytest
import torch

import dist_launch
import lape_kernels as lk
from lape_kernels import distributed
from lape_kernels.testing import hook_counts, tiny_model

from record_worker import LANGS, batch

FULL = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}


def test_no_launch_variables_change_nothing(monkeypatch):
    for k in distributed.LAUNCH_VARIABLES:
        monkeypatch.delenv(k, raising=False)
    assert distributed.launch_env() is None
    with distributed.launched(torch.device("cpu")) as launch:
        assert launch is None and not distributed.is_initialized()
        assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
        distributed.barrier()
        x = torch.arange(3)
        assert torch.equal(distributed.all_reduce_sum([x])[0], x)
        assert distributed.run_on_main(lambda: 7) == 7 and distributed.broadcast_object("a") == "a"
    s = lk.ActivationStats(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3), 4, {"language": "aa"})
    r = s.all_reduce()
    assert r.equal(s) and r is not s and r.meta == {"language": "aa", "world_size": 1}


def test_launch_env_reads_torchrun_variables():
    launch = distributed.launch_env(dict(FULL, RANK="1", LOCAL_RANK="1"))
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master) == (1, 2, 1, "127.0.0.1:29999")


@pytest.mark.parametrize("drop", ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"])
def test_half_set_environment_is_one_clear_line(drop):
    env = {k: v for k, v in FULL.items() if k != drop}
    with pytest.raises(distributed.DistributedError, match=rf"half-set distributed environment: .*but {drop} unset; "
                                                           r"start the command with torchrun"):
        distributed.launch_env(env)


def test_master_address_alone_is_one_process():
    """accelerate's one-process launcher (``accelerate launch --cpu``) sets MASTER_ADDR/PORT only."""
    assert distributed.launch_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}) is None


@pytest.mark.parametrize("bad, match", [({"RANK": "x"}, "RANK='x' is not an integer"),
                                        ({"RANK": "2"}, "RANK=2 WORLD_SIZE=2 LOCAL_RANK=0 is not a valid rank"),
                                        ({"WORLD_SIZE": "0"}, "is not a valid rank")])
def test_bad_values_are_named(bad, match):
    with pytest.raises(distributed.DistributedError, match=match):
        distributed.launch_env(dict(FULL, **bad))


def test_cli_half_set_environment(monkeypatch, tmp_path, capsys):
    """A half-set launch stops the command before any work, one line on stderr."""
    from lape_kernels.cli import main

    for k in distributed.LAUNCH_VARIABLES:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    rc = main(["collect", "--model", str(tmp_path / "nope"), "--languages", "aa", "bb", "-o", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith("lape-kernels collect: error: half-set distributed environment: RANK=0, WORLD_SIZE=2 "
                             "but LOCAL_RANK, MASTER_ADDR, MASTER_PORT unset"), err
    assert not (tmp_path / "s").exists()


def test_cli_one_process_commands_refuse_a_launch(monkeypatch, tmp_path, capsys):
    """identify/eval/demo do not split their work: under torchrun with 2 processes each would do
    all of it; refused with the reason, before anything is read."""
    from lape_kernels.cli import main

    for k, v in FULL.items():
        monkeypatch.setenv(k, v)
    rc = main(["identify", str(tmp_path / "stats"), "-o", str(tmp_path / "n")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == ("lape-kernels identify: error: identify runs in one process, not under torchrun with 2 "
                               "processes (only collect and finetune split their work); run it without torchrun"), err


CASES = ["llama:none", "llama:ddp", "llama:fsdp2", "qwen2_moe:ddp"]


@pytest.fixture(scope="module")
def two_process_records(tmp_path_factory):
    """One torchrun job of 2 processes recording every case (``record_worker.py``)."""
    out = tmp_path_factory.mktemp("records")
    worker = str(dist_launch.REPO / "tests" / "distributed" / "record_worker.py")
    p = dist_launch.run(2, [out, *CASES], module_or_script=[worker], timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.mark.parametrize("family, wrapper", [c.split(":") for c in CASES])
def test_record_all_reduce_equals_one_process(family, wrapper, two_process_records):
    """Each rank records its rows of one batch (bare model, DDP, FSDP2; a MoE model with its
    per-expert statistics); ``stats.all_reduce()`` gives the one-process counts of the whole
    batch, exactly for the counts, to summation order for act_sum."""
    got = lk.StatsByLanguage.load(two_process_records / f"{family}-{wrapper}")
    ids, mask, langs = batch()
    model = tiny_model(family, num_layers=2)
    with torch.no_grad(), lk.record(model, languages=LANGS) as want:
        want.set_batch_languages(langs)
        model(input_ids=ids, attention_mask=mask)
    # dense: float64 summation order only; MoE: the experts' GEMMs group a batch's tokens by
    # expert, so half a batch rounds its float32 activations (and all later layers) differently
    # (the signs, i.e. the counts, stay exact)
    tol = 1e-9 if family == "llama" else 1e-5
    for k, lang in enumerate(LANGS):
        g, w = got[lang], want[lang]
        assert g.meta["world_size"] == 2
        assert g.n_tokens == w.n_tokens == int(mask[langs == k].sum())
        assert torch.equal(g.over_zero, w.over_zero)
        torch.testing.assert_close(g.act_sum, w.act_sum, rtol=tol, atol=tol)
        assert (g.experts is None) == (w.experts is None) == (family != "qwen2_moe")
        if g.experts is not None:
            assert torch.equal(g.experts.over_zero, w.experts.over_zero)
            assert torch.equal(g.experts.routed, w.experts.routed) and int(g.experts.routed.sum()) > 0
            torch.testing.assert_close(g.experts.act_sum, w.experts.act_sum, rtol=tol, atol=tol)
    if family == "llama":  # and the one-process record equals the hook on the model's own activation
        hooks = hook_counts(model, ids, mask, token_lang=langs, num_langs=2)
        assert torch.equal(got["aa"].over_zero, hooks["over_zero"][0])
