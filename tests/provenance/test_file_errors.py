"""Every bad file is one line naming the file and the cause: corrupted safetensors (statistics,
neuron sets, saved neurons), bytes that are no torch file, refused pickles (without a warning
line from torch)."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest
import torch

import lape_kernels as lk
from lape_kernels.neurons import NeuronSet
from lape_kernels.neurons.neuron_set import NeuronSetFormatError
from lape_kernels.stats import ActivationStats, StatsByLanguage
from lape_kernels.testing import random_neurons, tiny_model
from lape_kernels.training.io import NeuronFileError


def _corrupt(path, how):
    data = path.read_bytes()
    if how == "random":
        path.write_bytes(os.urandom(len(data)))
    elif how == "truncated":
        path.write_bytes(data[: len(data) - 7])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "header":  # a valid length prefix, then garbage where the JSON header belongs
        path.write_bytes(data[:8] + b"\xff" * (len(data) - 8))


def _one_line_naming(exc, path, cause="not a valid safetensors file: "):
    message = str(exc.value)
    assert "\n" not in message, message
    assert f"{path}: {cause}" in message or f"'{path}': {cause}" in message, message


HOW = ["random", "truncated", "empty", "header"]


@pytest.mark.parametrize("how", HOW)
def test_corrupted_stats_file(tmp_path, how):
    path = tmp_path / "en.safetensors"
    ActivationStats(torch.tensor([[1, 2]]), torch.tensor([[0.5, 1.0]]), 3, {"language": "en"}).save(path)
    _corrupt(path, how)
    with pytest.raises(ValueError) as info:  # before: safetensors' SafetensorError, no path
        ActivationStats.load(path)
    _one_line_naming(info, path)


@pytest.mark.parametrize("how", HOW[:2])
def test_corrupted_file_in_a_stats_directory(tmp_path, how):
    stats = StatsByLanguage(["en", "cy"], {
        lang: ActivationStats(torch.tensor([[1, 2]]), None, 3, {"language": lang}) for lang in ("en", "cy")})
    stats.save(tmp_path / "stats")
    _corrupt(tmp_path / "stats" / "cy.safetensors", how)
    with pytest.raises(ValueError) as info:
        StatsByLanguage.load(tmp_path / "stats")
    _one_line_naming(info, tmp_path / "stats" / "cy.safetensors")
    (tmp_path / "stats" / "index.json").write_bytes(b"\xff{not json")
    with pytest.raises(ValueError, match="not a valid JSON index") as info:
        StatsByLanguage.load(tmp_path / "stats")
    assert str(tmp_path / "stats" / "index.json") in str(info.value)


def test_stats_file_with_bad_metadata(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file({"over_zero": torch.tensor([[1]])}, str(path), metadata={"format": "lape_kernels.ActivationStats",
                                                                     "n_tokens": "many"})
    with pytest.raises(ValueError, match="malformed ActivationStats metadata") as info:
        ActivationStats.load(path)
    assert str(path) in str(info.value)
    save_file({"over_zero": torch.tensor([[5]])}, str(path), metadata={"format": "lape_kernels.ActivationStats",
                                                                     "n_tokens": "2"})
    with pytest.raises(ValueError, match="counts above n_tokens=2") as info:
        ActivationStats.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("how", HOW)
def test_corrupted_neuron_set(tmp_path, how):
    NeuronSet({"en": [torch.tensor([1, 3]), torch.tensor([0])]}, 2, 4).save(tmp_path / "ns")
    path = tmp_path / "ns" / "neurons.safetensors"
    _corrupt(path, how)
    with pytest.raises(NeuronSetFormatError) as info:  # before: "cannot read safetensors: SafetensorError: ..."
        NeuronSet.load(tmp_path / "ns")
    _one_line_naming(info, path)


@pytest.mark.parametrize("how", HOW)
def test_corrupted_saved_neurons(tmp_path, how):
    model = tiny_model("llama")
    lk.patch(model, neurons=random_neurons(3, 128, 2))
    lk.save_neurons(model, tmp_path / "saved")
    path = tmp_path / "saved" / "lape_neurons.safetensors"
    _corrupt(path, how)
    fresh = tiny_model("llama")
    with pytest.raises(NeuronFileError) as info:
        lk.load_neurons(fresh, tmp_path / "saved")
    _one_line_naming(info, path)
    assert not lk.is_patched(fresh)


# ----------------------------------------------------------------------------- torch files
@pytest.mark.parametrize("content", [os.urandom(300), b"", b"\x00" * 64, b"PK\x03\x04 not really a zip"])
def test_bytes_that_are_no_torch_file(tmp_path, content):
    """Before: random bytes were reported as a refused pickle ("Please file an issue ...")."""
    path = tmp_path / "neurons.pt"
    path.write_bytes(content)
    with pytest.raises(NeuronSetFormatError) as info:
        NeuronSet.load(path)
    _one_line_naming(info, path, "not a torch file (torch.save) / not a LAPE reference file")
    assert "refused" not in str(info.value) and "file an issue" not in str(info.value)


def test_a_zip_that_is_no_torch_file(tmp_path):
    path = tmp_path / "neurons.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(NeuronSetFormatError) as info:
        NeuronSet.load(path)
    _one_line_naming(info, path, "not a torch file (torch.save) / not a LAPE reference file")


_LOAD_EVIL = r'''
import os, pickle, sys, torch
from lape_kernels.neurons import NeuronSet
from lape_kernels.neurons.neuron_set import NeuronSetFormatError

class Evil:
    def __reduce__(self):
        return (os.mkdir, (sys.argv[1] + "/pwned",))

pickle_path, torch_path = sys.argv[1] + "/evil.pkl", sys.argv[1] + "/evil.pt"
with open(pickle_path, "wb") as fh:
    pickle.dump(Evil(), fh, protocol=4)
torch.save([[torch.tensor([1])], Evil()], torch_path)
for path in (pickle_path, torch_path):
    try:
        NeuronSet.load(path)
    except NeuronSetFormatError as exc:
        print(exc)
'''


def test_refused_pickle_is_one_line_without_a_warning(tmp_path):
    """Before: torch printed "UserWarning: Detected pickle protocol 4 ..." (two lines) before our
    one-line error."""
    proc = subprocess.run([sys.executable, "-c", _LOAD_EVIL, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    assert lines[0].startswith(f"{tmp_path}/evil.pkl: refused to load") and "Unsupported operand" in lines[0]
    assert lines[1].startswith(f"{tmp_path}/evil.pt: refused to load") and "GLOBAL posix.mkdir" in lines[1]
    assert "file an issue" not in proc.stdout
    assert not (tmp_path / "pwned").exists()


def test_reference_file_in_the_old_torch_format_still_loads(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save([[torch.tensor([1, 2]), torch.tensor([0])]], path, _use_new_zipfile_serialization=False)
    assert NeuronSet.load(path, languages=["mt"]).layer_counts("mt") == [2, 1]
