"""``torchrun --nproc_per_node 2 lape-kernels collect`` as a user runs it (CPU, gloo, one thread
per process, the toy model and corpus): the one-process statistics, written once by rank 0;
kill -9 of the job and a rerun resumes, with the same or another number of processes."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import dist_launch
import lape_kernels as lk

LANGS = ["aa", "bb", "cc"]


def args(toy, out, *extra, tokens=16384):
    model, corpus = toy
    # chunks of 2 batches of 4 sequences: one batch per process in every save chunk
    return ["collect", "--model", model, "--data", corpus, "--languages", *LANGS, "--tokens", tokens, "--seq-len",
            "64", "--batch-size", "4", "--save-every", "2", "-o", out, *extra]


@pytest.fixture(scope="module")
def one_process(toy, tmp_path_factory):
    """The reference: the same command in one plain process."""
    out = tmp_path_factory.mktemp("one") / "stats"
    p = dist_launch.run_one(args(toy, out))
    assert p.returncode == 0, p.stderr
    return lk.StatsByLanguage.load(out)


def same_statistics(got, want, world):
    assert got.languages == want.languages == LANGS
    for lang in LANGS:
        g, w = got[lang], want[lang]
        assert g.n_tokens == w.n_tokens > 0
        assert torch.equal(g.over_zero, w.over_zero), lang
        torch.testing.assert_close(g.act_sum, w.act_sum, rtol=1e-12, atol=1e-9)  # float64 summation order
        assert g.meta["world_size"] == world and g.meta["complete"]


def test_two_processes_write_the_one_process_statistics(toy, one_process, tmp_path):
    out = tmp_path / "stats"
    p = dist_launch.run(2, args(toy, out))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [str(out)]  # printed once: rank 0's
    got = lk.StatsByLanguage.load(out)
    same_statistics(got, one_process, world=2)
    assert json.loads((out / "index.json").read_text())["collect"]["world_size"] == 2
    assert sorted(x.name for x in tmp_path.iterdir()) == ["stats"]  # no partial, lock or temporary left
    assert "2 processes" in p.stderr and "error" not in p.stderr


def kill_after_first_save(nproc, argv, out: Path):
    """Start ``collect`` with ``nproc`` processes (1: no torchrun) and kill -9 the whole job as
    soon as its resumable state holds a saved chunk; returns the sequences saved then."""
    if nproc == 1:
        import subprocess
        import sys

        job = subprocess.Popen([sys.executable, *dist_launch.cli_command(), *map(str, argv)], env=dist_launch.env(),
                               cwd=str(dist_launch.REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    else:
        job = dist_launch.popen(nproc, argv)
    partial = out.parent / f".{out.name}.partial"
    deadline = time.monotonic() + 240
    while not list(partial.glob("*.safetensors")) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    ended = job.poll()
    err = dist_launch.kill_job(job)[1]
    saved = {f.stem: lk.ActivationStats.load(f).meta["sequences_done"] for f in partial.glob("*.safetensors")}
    assert ended is None and saved and not out.exists(), \
        f"the job ended (exit {ended}) before it could be killed: {err[-2000:]}"
    return saved


@pytest.mark.slow  # 2 jobs each (about 40 s on a loaded 2-core machine)
@pytest.mark.parametrize("first, then", [(2, 2), (2, 1), (1, 2)])
def test_kill_9_and_rerun_resumes(toy, one_process, tmp_path, first, then):
    """The saved state is whole chunks summed over every process, so a rerun continues it with
    any number of processes and ends with the one-process statistics."""
    out = tmp_path / "stats"
    argv = args(toy, out)
    saved = kill_after_first_save(first, argv, out)
    p = dist_launch.run(then, argv) if then > 1 else dist_launch.run_one(argv)
    assert p.returncode == 0, p.stderr
    assert "resuming collection from" in p.stderr, p.stderr
    if first != then:
        assert f"started with {first} processes, continued with {then}" in p.stderr, p.stderr
    assert all(n > 0 for n in saved.values())
    same_statistics(lk.StatsByLanguage.load(out), one_process, world=then)


@pytest.mark.slow
def test_rank_0_refusal_stops_every_rank(toy, one_process, tmp_path):
    """Rank 0 decides about files (here: an output of other settings exists); every rank stops
    with its reason, nothing is written."""
    out = tmp_path / "stats"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    p = dist_launch.run(2, args(toy, out))
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("lape-kernels collect: error:")]
    assert len(errors) == 1, p.stderr  # rank 0's reason, once (the other rank stops silently)
    assert errors[0].startswith(f"lape-kernels collect: error: {out} exists (not a finished collection); pass --overwrite")
    assert sorted(x.name for x in out.iterdir()) == ["mine.txt"]
