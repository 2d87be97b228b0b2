"""Nothing lost: no command replaces what it did not create without ``--overwrite``, writes into
or over its own input, or lets two processes build one output at once; a bad output is
reported before the model is loaded."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safety_world import REPO, leftovers, one_line_error

MISSING_MODEL = "/nonexistent/lape-model"  # loading it would fail: an -o error must come first


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- what the user owns
def test_identify_refuses_a_users_directory(world, tmp_path):
    """Before: `identify STATS -o DIR` deleted the user's directory and its files."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    rc, _, err = world.main("identify", str(world.stats_a), "--top-rate", "0.1", "-o", str(mine))
    assert rc == 1
    one_line_error(err, str(mine), "exists", "--overwrite")
    assert _tree(mine) == {"thesis.tex": b"years of work"}
    assert leftovers(mine) == []
    world.ok("identify", str(world.stats_a), "--top-rate", "0.1", "-o", str(mine), "--overwrite")
    assert (mine / "neurons.json").exists() and not (mine / "thesis.tex").exists()


def test_identify_refuses_a_file_pair_that_exists(world, tmp_path):
    (tmp_path / "n.safetensors").write_bytes(b"user data")
    rc, _, err = world.main("identify", str(world.stats_a), "--top-rate", "0.1", "-o", str(tmp_path / "n.json"))
    assert rc == 1
    one_line_error(err, "n.safetensors", "exists", "--overwrite")
    assert (tmp_path / "n.safetensors").read_bytes() == b"user data" and not (tmp_path / "n.json").exists()


@pytest.mark.parametrize("where", ["itself", "inside", "contains"])
def test_an_output_is_never_its_own_input(world, tmp_path, where):
    """Before: `identify STATS -o STATS` replaced the statistics it was reading by the neurons."""
    stats = tmp_path / "work" / "stats"
    shutil.copytree(world.stats_a, stats)
    before = _tree(stats)
    out = {"itself": stats, "inside": stats / "neurons", "contains": tmp_path / "work"}[where]
    for extra in ([], ["--overwrite"]):  # --overwrite does not make it safe
        rc, _, err = world.main("identify", str(stats), "--top-rate", "0.1", "-o", str(out), *extra)
        assert rc == 1
        one_line_error(err, str(out), "input", str(stats))
        assert _tree(stats) == before


def test_collect_and_finetune_never_write_into_their_corpus_or_model(world, tmp_path):
    corpus = world.corpus_copy(tmp_path / "corpus")
    before = _tree(corpus)
    rc, _, err = world.main(*world.collect_args(world.model_a, corpus, corpus / "stats"))
    assert rc == 1
    one_line_error(err, "inside the input", str(corpus))
    rc, _, err = world.main(*world.finetune_args(world.model_a, corpus, world.model_a / "run", "--overwrite"))
    assert rc == 1
    one_line_error(err, "inside the input", str(world.model_a))
    assert _tree(corpus) == before and not (world.model_a / "run").exists()


def test_eval_refuses_to_replace_a_file(world, tmp_path):
    """Before: `eval -o FILE` replaced any file (collect and finetune refused)."""
    out = tmp_path / "notes.json"
    out.write_text("my notes")
    rc, _, err = world.main(*world.eval_args(world.model_a, out))
    assert rc == 1
    one_line_error(err, str(out), "exists", "--overwrite")
    assert out.read_text() == "my notes"
    world.ok(*world.eval_args(world.model_a, out, "--overwrite"))
    assert json.loads(out.read_text())["format"] == "lape_kernels.eval"
    assert leftovers(out) == []


# ----------------------------------------------------------------------------- reported first
def _bad_outputs(tmp_path: Path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    (a_dir / "keep").write_text("x")
    yield "a directory", a_dir, "is a directory"
    yield "under a file", a_file / "out", "is a file"
    yield "not writable", Path("/proc/lape-safety-out"), "cannot write"


@pytest.mark.parametrize("command", ["collect", "identify", "finetune", "eval"])
def test_a_bad_output_is_reported_before_the_model_loads(world, tmp_path, command):
    """Before: a read-only or directory -o was reported only after the model loaded (or the
    results were computed). The model here does not exist: the -o error must come first."""
    for label, out, needle in _bad_outputs(tmp_path):
        if label == "a directory" and command != "eval":
            needle = "exists"  # a directory output: refused without --overwrite
        if True:
            args = {
                "collect": world.collect_args(MISSING_MODEL, world.corpus, out),
                "identify": ["identify", str(world.stats_a), "-o", str(out)],
                "finetune": world.finetune_args(MISSING_MODEL, world.corpus, out),
                "eval": world.eval_args(MISSING_MODEL, out),
            }[command]
            rc, _, err = world.main(*args)
            assert rc == 1, label
            line = one_line_error(err, str(out), needle)
            assert MISSING_MODEL not in line, line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_reported_before_the_model_loads(world, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, _, err = world.main(*world.eval_args(MISSING_MODEL, ro / "e.json"))
        assert rc == 1
        one_line_error(err, str(ro / "e.json"), "Permission denied")
    finally:
        ro.chmod(0o755)


# ----------------------------------------------------------------------------- one process at a time
_HOLD = r'''
import sys
from lape_kernels.files import output_lock
with output_lock(sys.argv[1], "collect"):
    print("locked", flush=True)
    sys.stdin.read()
'''


def test_a_second_process_stops_naming_the_first(world, tmp_path):
    """Before: two runs on one -o shared `.X.partial` and temporary names (one crashed, the last
    to finish replaced the other's output). A process holding the output's lock (the lock the
    CLI takes) makes a CLI run on the same output stop, naming the holder; then it runs."""
    import socket

    out = tmp_path / "stats"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, _, err = world.process(*world.collect_args(world.model_a, world.corpus, out))
        assert rc == 1
        one_line_error(err, str(out), f"pid {holder.pid} on host {socket.gethostname()}", "collect")
        assert not out.exists() and not (tmp_path / ".stats.partial").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert leftovers(out) == []  # the lock file goes with its holder
    world.ok(*world.collect_args(world.model_a, world.corpus, out))
    assert leftovers(out) == []


def test_two_cli_processes_on_one_output_never_interleave(world, tmp_path):
    """Two real `collect` processes started together on one output: each either does the work
    or stops naming the other's pid (or finds the other's finished output); the output is the
    one a single run writes, and nothing is left beside it."""
    from lape_kernels.stats import StatsByLanguage

    out = tmp_path / "stats"
    args = world.collect_args(world.model_a, world.corpus, out, tokens=4096)
    procs = [world.popen(*args) for _ in range(2)]
    results = [(p.pid, *p.communicate(timeout=300)) for p in procs]
    pids = [r[0] for r in results]
    codes = [p.returncode for p in procs]
    assert 0 in codes, results
    for (pid, _, err), code in zip(results, codes):
        if code != 0:
            other = pids[1 - pids.index(pid)]
            one_line_error(err, f"pid {other} on host", "is being written by another process")
        else:
            assert "Traceback" not in err
    reference = tmp_path / "reference"
    world.ok(*world.collect_args(world.model_a, world.corpus, reference, tokens=4096))
    got, want = StatsByLanguage.load(out), StatsByLanguage.load(reference)
    assert all(got[lang].equal(want[lang]) for lang in world.LANGS)
    assert leftovers(out) == []
