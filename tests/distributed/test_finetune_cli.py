"""``torchrun --nproc_per_node 2 lape-kernels finetune`` as a user runs it (CPU, gloo, one thread
per process, the toy model, corpus and neurons): ``--batch-size`` is the global batch, and the
trained values equal the one-process run's to fp32 rounding under DDP and FSDP2; rank 0 alone
writes the run, which records its world size; a batch that does not split is one clear line
before any work; a killed or stopped job resumes, also with another number of processes and the
other kind of checkpoint (full DDP state <-> sharded FSDP2 state)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict

import pytest
import torch
from safetensors.torch import load_file

import dist_launch

STEPS = 4
LR = {"neurons": "1e-2", "full": "1e-3"}


@pytest.fixture(scope="module")
def neurons(toy, tmp_path_factory) -> Path:
    """Neurons identified on the toy model (in this process: seconds)."""
    from lape_kernels.cli import main

    model, corpus = toy
    root = tmp_path_factory.mktemp("neurons")
    assert main(["collect", "--model", str(model), "--data", str(corpus), "--languages", "aa", "bb", "--tokens", "2048",
                 "--seq-len", "64", "-o", str(root / "stats")]) == 0
    assert main(["identify", str(root / "stats"), "--top-rate", "0.1", "-o", str(root / "neurons")]) == 0
    return root / "neurons"


def args(toy, neurons, out, method="neurons", *extra) -> list:
    model, corpus = toy
    return ["finetune", "--model", model, "--data", corpus, "--language", "aa", "--method", method, "--neurons",
            neurons, "--steps", STEPS, "--batch-size", "4", "--seq-len", "64", "--eval-every", "2", "--save-every",
            "1", "--val-tokens", "256", "--lr", LR[method], "-o", out, *extra]


@pytest.fixture(scope="module")
def one_process(toy, neurons, tmp_path_factory):
    """method -> the run directory of the same command in this one process (made once)."""
    from lape_kernels.cli import main

    made: Dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in made:
            out = tmp_path_factory.mktemp("one") / method
            assert main(list(map(str, args(toy, neurons, out, method)))) == 0
            made[method] = out
        return made[method]

    return get


def trained(run: Path) -> Dict[str, torch.Tensor]:
    files = sorted((run / "best").glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(str(files[0]))


def same_run(got: Path, want: Path, world: int, kind: str = "ddp") -> float:
    """The 2-process run equals the one-process one: trained values to fp32 rounding, the same
    losses and validation; returns max |difference| of the trained values."""
    g, w = trained(got), trained(want)
    assert set(g) == set(w) and g
    worst = 0.0
    for name in w:
        if not w[name].is_floating_point():
            assert torch.equal(g[name], w[name]), name  # neuron indices
            continue
        torch.testing.assert_close(g[name], w[name], rtol=1e-5, atol=1e-6, msg=name)
        worst = max(worst, float((g[name].double() - w[name].double()).abs().max()))
    logs = [[json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] for run in (got, want)]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == list(range(1, STEPS + 1))
    for a, b in zip(*logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert ("val_loss" in a) == ("val_loss" in b)
        if "val_loss" in b:
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    info, ref = (json.loads((run / "run.json").read_text()) for run in (got, want))
    assert (info["world_size"], info["distributed"], ref["world_size"], ref["distributed"]) == (world, kind, 1, None)
    assert info["config_hash"] == ref["config_hash"] and info["tokens_per_step"] == ref["tokens_per_step"] == 4 * 64
    assert info["best"]["step"] == ref["best"]["step"]
    return worst


def moved(run: Path, model_dir: Path) -> float:
    """How far training moved the trained values from the base model's (so equality means something)."""
    base = load_file(str(model_dir / "model.safetensors"))
    t = trained(run)
    if "weights" in json.loads((run / "run.json").read_text())["artifact_format"]:
        return max(float((t[n] - base[n]).abs().max()) for n in t)
    li = int(next(iter(t)).split(".")[1])
    rows = base[f"model.layers.{li}.mlp.gate_proj.weight"][t[f"layers.{li}.index"]]
    return float((t[f"layers.{li}.gate_rows"] - rows).abs().max())


def two(argv, *, nproc=2):
    p = dist_launch.run(nproc, list(map(str, argv)))
    assert p.returncode == 0, p.stderr[-3000:]
    return p


# ----------------------------------------------------------------------------- fast
def test_batch_that_does_not_split_is_one_clear_line_before_any_work(toy, neurons, tmp_path):
    out = tmp_path / "run"
    p = dist_launch.run(2, list(map(str, args(toy, neurons, out, "neurons", "--batch-size", "3"))))
    assert p.returncode != 0
    want = ("lape-kernels finetune: error: --batch-size 3 (the global batch) does not split evenly over 2 processes x "
            "--grad-accum 1: give a multiple of 2 (e.g. 2 or 4)")
    assert [line for line in p.stderr.splitlines() if "error:" in line] == [want], p.stderr[-3000:]  # once
    assert not [line for line in p.stderr.splitlines() if line.startswith("[rank")]  # no worker traceback
    assert list(tmp_path.iterdir()) == []  # no output, partial run or lock


def test_a_missing_neuron_set_is_one_line_for_the_job(toy, neurons, tmp_path):
    """Every rank would reach the same error: rank 0 says it once, the other rank stops silently."""
    out = tmp_path / "run"
    p = dist_launch.run(2, list(map(str, args(toy, tmp_path / "nothere", out, "neurons"))))
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert errors == [f"lape-kernels finetune: error: --neurons {tmp_path / 'nothere'}: no such neuron set"], p.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


def test_grad_accum_that_does_not_split_in_one_process(toy, neurons, tmp_path, capsys):
    from lape_kernels.cli import main

    assert main(list(map(str, args(toy, neurons, tmp_path / "run", "neurons", "--grad-accum", "3")))) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("lape-kernels finetune: error: --batch-size 4 (the global batch) does not split evenly over "
                   "--grad-accum 3: give a multiple of 3 (e.g. 3 or 6)")
    assert list(tmp_path.iterdir()) == []


def test_two_processes_ddp_train_the_one_process_neurons(toy, neurons, one_process, tmp_path):
    out = tmp_path / "run"
    p = two(args(toy, neurons, out))
    assert p.stdout.splitlines()[-1] == str(out) and p.stdout.count(str(out)) == 1  # printed once: rank 0's
    assert "tok/s, 2 processes (ddp) -> " in p.stderr and "error" not in p.stderr
    assert moved(one_process("neurons"), toy[0]) > 1e-3
    same_run(out, one_process("neurons"), world=2)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["run"]  # no partial, lock or temporary left
    assert sorted(x.name for x in out.iterdir()) == ["best", "log.jsonl", "neurons", "run.json"]


# ----------------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.parametrize("method, kind, extra", [("full", "ddp", []), ("neurons", "fsdp2", []),
                                                 ("neurons", "ddp", ["--grad-accum", "2"])])
def test_two_processes_train_the_one_process_values(toy, neurons, one_process, tmp_path, method, kind, extra):
    out = tmp_path / "run"
    two(args(toy, neurons, out, method, "--distributed", kind, *extra))
    assert moved(one_process(method), toy[0]) > 1e-4
    same_run(out, one_process(method), world=2, kind=kind)
    assert json.loads((out / "run.json").read_text())["grad_accum"] == (2 if extra else 1)


@pytest.mark.slow
def test_stopped_fsdp2_job_resumes_in_one_process(toy, neurons, one_process, tmp_path):
    """A sharded FSDP2 checkpoint of 2 processes (torch.distributed.checkpoint) continued by one
    plain process, which reads the whole tensors."""
    out = tmp_path / "run"
    p = dist_launch.run(2, list(map(str, args(toy, neurons, out, "neurons", "--distributed", "fsdp2",
                                              "--stop-after-steps", "2"))))
    assert p.returncode != 0 and "stopped after 2 of 4 steps" in p.stderr
    ckpt = tmp_path / ".run.partial" / "checkpoint"
    assert (ckpt / "sharded").is_dir() and json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    p = dist_launch.run_one(list(map(str, args(toy, neurons, out))))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming neurons from step 2/4" in p.stderr and "written by 2 processes" in p.stderr
    same_run(out, one_process("neurons"), world=1, kind=None)


@pytest.mark.slow
def test_killed_ddp_job_resumes_with_two_processes(toy, neurons, one_process, tmp_path):
    """kill -9 of the whole 2-process job once a checkpoint exists; the same command resumes it."""
    out = tmp_path / "run"
    argv = list(map(str, args(toy, neurons, out)))
    job = dist_launch.popen(2, argv)
    state = tmp_path / ".run.partial" / "checkpoint" / "state.json"
    deadline = time.monotonic() + 240
    while not state.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    ended = job.poll()
    dist_launch.kill_job(job)
    assert ended is None and state.exists() and not out.exists(), f"the job ended (exit {ended}) before the kill"
    p = two(argv)
    assert "resuming neurons from step" in p.stderr and "written by" not in p.stderr
    same_run(out, one_process("neurons"), world=2)


@pytest.mark.slow
def test_stopped_ddp_job_resumes_under_fsdp2_with_one_process(toy, neurons, one_process, tmp_path):
    """The full state of a 2-process DDP checkpoint taken by FSDP2 in a world of 1 (every rank
    takes its shards of the full tensors; the optimizer state is named by parameter)."""
    out = tmp_path / "run"
    argv = list(map(str, args(toy, neurons, out)))
    assert dist_launch.run(2, argv + ["--stop-after-steps", "3"]).returncode != 0
    assert (tmp_path / ".run.partial" / "checkpoint" / "trainable.safetensors").is_file()
    p = two(argv + ["--distributed", "fsdp2"], nproc=1)
    assert "resuming neurons from step 3/4" in p.stderr and "written by 2 processes" in p.stderr
    same_run(out, one_process("neurons"), world=1, kind="fsdp2")
