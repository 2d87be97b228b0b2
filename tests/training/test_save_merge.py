"""Saving, loading and merging trained neurons; unpatch without merge restores the base."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lape_kernels
from lape_kernels import patching
from lape_kernels.training import load_neurons, merge, save_neurons, trainable_parameters
from lape_kernels.training.io import CONFIG_NAME, WEIGHTS_NAME, NeuronFileError

from lape_kernels.testing import tiny_model

H, I = 64, 128


def make_model(family="llama", seed=0, **kw):
    return tiny_model(family, seed=seed, num_layers=2, intermediate=kw.pop("intermediate", I), **kw)


def neurons(k=(5, 0), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(I, generator=g)[:n].sort().values for n in k]


def ids_batch(seed=0):
    return torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(seed))


def train(model, steps=3):
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    for step in range(steps):
        ids = ids_batch(step)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3_text"])
def test_save_load_merge_roundtrip(family, tmp_path):
    base = make_model(family)
    original = state(base)
    model = copy.deepcopy(base)
    lape_kernels.patch(model, neurons=neurons(k=(5, 3)))
    model.train()
    train(model)
    model.eval()
    ids = ids_batch(9)
    with torch.no_grad():
        trained_logits = model(ids).logits

    out = save_neurons(model, tmp_path / "adapter")
    files = sorted(p.name for p in out.iterdir())
    assert files == [CONFIG_NAME, WEIGHTS_NAME]
    assert (out / WEIGHTS_NAME).stat().st_size < 20_000  # only the slices: kilobytes
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["counts"] == [5, 3] and cfg["model_type"] == base.config.model_type
    assert (cfg["num_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (2, H, I)
    assert cfg["dtype"] == "float32" and cfg["format_version"] == 1

    fresh = copy.deepcopy(base)
    load_neurons(fresh, out)
    assert patching.is_patched(fresh)
    assert all(p.requires_grad for p in trainable_parameters(fresh))
    assert sum(p.numel() for p in fresh.parameters() if p.requires_grad) == 3 * H * 8
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, trained_logits, rtol=0, atol=0)

    merged = merge(fresh)
    assert not patching.is_patched(merged)
    assert not any("lape" in n for n in merged.state_dict())
    assert "forward" not in merged.__dict__
    for layer in merged.model.layers:
        assert "forward" not in layer.mlp.__dict__ and not hasattr(layer.mlp, "_lape")
    assert all(p.requires_grad for p in merged.parameters())  # original flags restored
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained_logits, rtol=1e-5, atol=1e-5)
    # only the selected rows/cols of the MLP weights changed
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, original[k])}
    assert changed and all(".mlp." in k for k in changed)

    merged.save_pretrained(tmp_path / "merged")
    reloaded = type(base).from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in reloaded.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, merged(ids).logits, rtol=0, atol=0)

    # unpatch WITHOUT merge: the original weights, bit for bit
    lape_kernels.unpatch(model)
    now = model.state_dict()
    assert now.keys() == original.keys()
    assert all(torch.equal(now[k], original[k]) for k in original)


def test_merged_rows_are_exactly_the_slices():
    model = make_model("qwen3")
    sel = neurons(k=(4, 2))
    lape_kernels.patch(model, neurons=sel)
    train(model, steps=1)
    slices = [[p.detach().clone() for p in (m.lape_gate_rows, m.lape_up_rows, m.lape_down_cols)]
              if hasattr(m, "lape_gate_rows") else None for m in patching.patched_mlps(model)]
    merge(model)
    for layer, s, vals in zip(model.model.layers, sel, slices):
        mlp = layer.mlp
        assert torch.equal(mlp.gate_proj.weight[s], vals[0])
        assert torch.equal(mlp.up_proj.weight[s], vals[1])
        assert torch.equal(mlp.down_proj.weight[:, s], vals[2])


def test_empty_layers_and_language_are_saved(tmp_path):
    from lape_kernels.neurons import NeuronSet

    ns = NeuronSet({"mt": neurons(k=(0, 4))}, num_layers=2, intermediate_size=I)
    model = make_model("mistral")
    lape_kernels.patch(model, neurons=ns, language="mt")
    save_neurons(model, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["language"] == "mt" and cfg["counts"] == [0, 4]
    assert sorted(load_file(str(tmp_path / WEIGHTS_NAME))) == [
        "layers.1.down_cols", "layers.1.gate_rows", "layers.1.index", "layers.1.up_rows"]
    fresh = make_model("mistral")
    load_neurons(fresh, tmp_path)
    assert fresh._lape_sparse["language"] == "mt"
    assert torch.equal(fresh.model.layers[1].mlp.lape_neuron_index, ns["mt"][1])


def test_bf16_dtype_recorded_and_cast_on_load(tmp_path):
    model = make_model("llama", dtype=torch.bfloat16)
    lape_kernels.patch(model, neurons=neurons())
    save_neurons(model, tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["dtype"] == "bfloat16"
    fp32 = make_model("llama")
    load_neurons(fp32, tmp_path)  # a bf16 adapter onto an fp32 base: values cast
    p = fp32.model.layers[0].mlp.lape_gate_rows
    assert p.dtype == torch.float32
    assert torch.equal(p, model.model.layers[0].mlp.lape_gate_rows.float())
    _edit_config(tmp_path, dtype="float32")  # declared dtype must match the tensors
    with pytest.raises(NeuronFileError, match="dtype torch.bfloat16, expected torch.float32"):
        load_neurons(make_model("llama"), tmp_path)
    _edit_config(tmp_path, dtype="int8")
    with pytest.raises(NeuronFileError, match="unsupported dtype"):
        load_neurons(make_model("llama"), tmp_path)


@pytest.fixture
def saved(tmp_path):
    model = make_model("llama")
    lape_kernels.patch(model, neurons=neurons(k=(3, 2)))
    save_neurons(model, tmp_path / "a")
    return tmp_path / "a"


def _edit_config(path, **changes):
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg.update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "other, match",
    [
        (lambda: make_model("qwen2"), "model_type"),
        (lambda: make_model("llama", intermediate=96), "intermediate_size mismatch"),
        (lambda: tiny_model("llama", num_layers=3, intermediate=I), "num_layers mismatch"),
    ],
)
def test_load_onto_mismatched_model(saved, other, match):
    model = other()
    with pytest.raises(NeuronFileError, match=match):
        load_neurons(model, saved)
    assert not patching.is_patched(model)  # a failed load leaves the model as it was


def test_malformed_files(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_neurons(make_model(), tmp_path / "nope")
    (saved / CONFIG_NAME).write_text("{not json")
    with pytest.raises(NeuronFileError, match="not valid JSON"):
        load_neurons(make_model(), saved)
    model = make_model()
    lape_kernels.patch(model, neurons=neurons(k=(3, 2)))
    save_neurons(model, saved)
    _edit_config(saved, format_version=99)
    with pytest.raises(NeuronFileError, match="format_version"):
        load_neurons(make_model(), saved)
    _edit_config(saved, format_version=1, counts=[3, 1])
    with pytest.raises(NeuronFileError, match="layers.1.index has shape"):
        load_neurons(make_model(), saved)
    _edit_config(saved, counts=[3])
    with pytest.raises(NeuronFileError, match="counts"):
        load_neurons(make_model(), saved)
    _edit_config(saved, counts=[3, 0])
    with pytest.raises(NeuronFileError, match="unexpected"):
        load_neurons(make_model(), saved)
    _edit_config(saved, counts=[3, 2])
    t = load_file(str(saved / WEIGHTS_NAME))
    t["layers.0.index"] = torch.tensor([5, 1, 9])
    save_file(t, str(saved / WEIGHTS_NAME))
    with pytest.raises(NeuronFileError, match="sorted unique"):
        load_neurons(make_model(), saved)
    (saved / WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(NeuronFileError, match=f"^{saved / WEIGHTS_NAME}: not a valid safetensors file: "):
        load_neurons(make_model(), saved)
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_neurons(make_model(), saved)


def test_save_and_merge_need_trainable_neurons(tmp_path):
    model = make_model()
    with pytest.raises(RuntimeError, match="no trainable neurons"):
        save_neurons(model, tmp_path)
    lape_kernels.patch(model)
    with pytest.raises(RuntimeError, match="no trainable neurons"):
        merge(model)
    lape_kernels.patch(model, neurons=neurons())
    with pytest.raises(RuntimeError, match="without trainable neurons"):
        load_neurons(model, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("script, extra", [("train_plain_loop.py", []), ("train_plain_loop.py", ["--recompute", "up"]),
                                           ("train_with_trainer.py", [])])
def test_examples_run(script, extra, tmp_path):
    """The examples train, save, reload (bit-exact) and merge on a tiny model."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "examples" / script), "--steps", "3", "--family", "phi3",
                           "--out", str(tmp_path), *extra], capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "max |logit diff| = 0.00e+00" in proc.stdout
    assert (tmp_path / "neurons" / CONFIG_NAME).is_file()
    assert (tmp_path / "merged" / "config.json").is_file()
