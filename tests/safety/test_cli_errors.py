"""Every CLI error is one line naming the file and the cause, with the way out where there is
one (`--overwrite`, delete the `.partial`); library warnings are not printed; a failure leaves
nothing behind; a budget above what the corpus holds is a one-line warning."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safety_world import leftovers, one_line_error


def _corpus_with(world, tmp_path, content: bytes) -> Path:
    corpus = world.corpus_copy(tmp_path / "corpus")
    (corpus / "bb.txt").write_bytes(content)
    return corpus


@pytest.mark.parametrize("content,cause", [(b"", "empty text file"), (b"\n \n", "empty text file"),
                                           (b"caf\xe9 au lait\n", "not valid utf-8 text: byte 0xe9 at offset 3")])
def test_bad_text_file_names_the_file_and_the_cause(world, tmp_path, content, cause):
    """Before: "DatasetGenerationError: An error occurred while generating the dataset"."""
    corpus = _corpus_with(world, tmp_path, content)
    out = tmp_path / "stats"
    rc, _, err = world.main(*world.collect_args(world.model_a, corpus, out))
    assert rc == 1
    line = one_line_error(err, str(corpus / "bb.txt"), cause)
    assert "DatasetGenerationError" not in line
    assert not out.exists() and leftovers(out) == []


def _corrupt(path: Path) -> None:
    path.write_bytes(os.urandom(max(64, path.stat().st_size)))


def test_corrupted_statistics(world, tmp_path):
    stats = tmp_path / "stats"
    shutil.copytree(world.stats_a, stats)
    _corrupt(stats / "bb.safetensors")
    out = tmp_path / "n"
    rc, _, err = world.main("identify", str(stats), "-o", str(out))
    assert rc == 1
    one_line_error(err, str(stats / "bb.safetensors"), "not a valid safetensors file")
    assert not out.exists() and leftovers(out) == []


def test_corrupted_partial_of_an_interrupted_collect(world, tmp_path, monkeypatch):
    out = tmp_path / "stats"
    args = world.collect_args(world.model_a, world.corpus, out)
    world.interrupted_collect(args, monkeypatch)
    saved = tmp_path / ".stats.partial" / "aa.safetensors"
    _corrupt(saved)
    rc, _, err = world.main(*args)
    assert rc == 1
    one_line_error(err, str(saved), "not a valid safetensors file", "--overwrite")
    world.ok(*args, "--overwrite")
    assert leftovers(out) == []


@pytest.mark.parametrize("name", ["trainable.safetensors", "state.pt", "state.json"])
def test_corrupted_checkpoint_of_an_interrupted_finetune(world, tmp_path, name):
    out = tmp_path / "run"
    args = world.finetune_args(world.model_a, world.corpus, out, steps=4)
    assert world.main(*args, "--stop-after-steps", "1")[0] == 3
    bad = tmp_path / ".run.partial" / "checkpoint" / name
    _corrupt(bad)
    rc, _, err = world.main(*args)
    assert rc == 1
    one_line_error(err, str(bad), "--overwrite")
    world.ok(*args, "--overwrite")
    assert leftovers(out) == []


def test_torn_log_of_an_interrupted_finetune(world, tmp_path):
    """A line torn by a kill after the last checkpoint is dropped (its step is redone); a damaged
    line before it is an error naming the file and line."""
    out, ref = tmp_path / "run", tmp_path / "ref"
    args = world.finetune_args(world.model_a, world.corpus, out, steps=4)
    world.ok(*world.finetune_args(world.model_a, world.corpus, ref, steps=4))
    assert world.main(*args, "--stop-after-steps", "2")[0] == 3
    log = tmp_path / ".run.partial" / "log.jsonl"
    good = log.read_text()
    log.write_text(good + '{"step": 3, "tokens": 7')  # killed while writing step 3
    world.ok(*args)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert json.loads((out / "run.json").read_text())["final"] == json.loads((ref / "run.json").read_text())["final"]

    shutil.rmtree(out)
    assert world.main(*args, "--stop-after-steps", "2")[0] == 3
    lines = log.read_text().splitlines()
    log.write_text(lines[0][:10] + "\n" + "\n".join(lines[1:]) + "\n")
    rc, _, err = world.main(*args)
    assert rc == 1
    one_line_error(err, f"{log}: line 1", "--overwrite")


def test_random_bytes_as_a_neuron_file(world, tmp_path):
    """Before: reported as a refused pickle."""
    bad = tmp_path / "neurons.pt"
    bad.write_bytes(os.urandom(300))
    out = tmp_path / "run"
    rc, _, err = world.main(*world.finetune_args(world.model_a, world.corpus, out, "--neuron-languages", "aa", "bb",
                                                 neurons=bad))
    assert rc == 1
    line = one_line_error(err, str(bad), "not a torch file")
    assert "refused" not in line
    assert not out.exists() and leftovers(out) == []


class _Evil:
    def __reduce__(self):
        return (os.mkdir, ("/tmp/lape-safety-pwned",))


def test_a_refused_pickle_is_one_line_without_warnings(world, tmp_path):
    """Before: torch printed a UserWarning line before the CLI's one line."""
    evil = tmp_path / "evil.pt"
    torch.save([[torch.tensor([1])], _Evil()], evil, pickle_protocol=4)
    out = tmp_path / "run"
    rc, _, err = world.process(*world.finetune_args(world.model_a, world.corpus, out, "--neuron-languages", "aa",
                                                    neurons=evil))
    assert rc == 1
    one_line_error(err, str(evil), "refused to load")
    assert not os.path.exists("/tmp/lape-safety-pwned")
    assert not out.exists() and leftovers(out) == []


def test_unsupported_activation_leaves_nothing(world, tmp_path):
    """Before: found after `.X.partial/` was created, which was left behind."""
    relu = tmp_path / "relu"
    shutil.copytree(world.model_a, relu)
    config = json.loads((relu / "config.json").read_text())
    config["hidden_act"] = "relu"
    (relu / "config.json").write_text(json.dumps(config))
    for args, out in ((world.collect_args(relu, world.corpus, tmp_path / "s"), tmp_path / "s"),
                      (world.finetune_args(relu, world.corpus, tmp_path / "r"), tmp_path / "r")):
        rc, _, err = world.main(*args)
        assert rc == 1
        one_line_error(err, "ReLU", "is not one of our kernels'")
        assert not out.exists() and leftovers(out) == []


def test_a_budget_above_the_corpus_warns_once(world, tmp_path):
    out = tmp_path / "stats"
    err = world.ok(*world.collect_args(world.model_a, world.corpus, out, tokens=10 ** 7))
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 2, err  # one per language
    assert "'aa'" in warnings[0] and "10000000" in warnings[0] and "--tokens" in warnings[0]
    err = world.ok(*world.finetune_args(world.model_a, world.corpus, tmp_path / "run", "--tokens", "100000",
                                        "--eval-every", "1000"))
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "--tokens 100000" in warnings[0] and "'aa'" in warnings[0], err
