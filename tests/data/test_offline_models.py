"""Offline models: loading local and packaged models (packaged names are slow tests), the GGUF
assembly and one-time conversion. (The tiny random models and tokenizer are
lape_kernels.testing's, tested in tests/model/test_testing.py.)"""

from __future__ import annotations

import json
import math
import zipfile

import pytest
import torch

from lape_kernels.data import load_model
from lape_kernels.data import models as M
from lape_kernels.data.corpus import corpus_dir
from lape_kernels.testing import tiny_model, tiny_tokenizer

# --------------------------------------------------------------------------------------------
# load_model (local paths; packaged names are slow tests)
# --------------------------------------------------------------------------------------------


def test_load_model_from_local_dir(tmp_path):
    model = tiny_model("llama", seed=1)
    tok = tiny_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, ltok = load_model(tmp_path / "m", dtype=torch.bfloat16)
    assert not loaded.training
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.model.embed_tokens.weight.float(),
                       model.model.embed_tokens.weight.bfloat16().float())
    assert ltok("abc")["input_ids"] == tok("abc")["input_ids"]


def test_load_model_errors(tmp_path):
    with pytest.raises(TypeError, match="dtype"):
        load_model("gemma3-270m", dtype=torch.int8)
    with pytest.raises(OSError, match="cannot load model"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown packaged model"):
        M.model_cache_dir("llama-7b")
    with pytest.raises(ValueError, match="pinned"):
        M.fetch_wheel("django", tmp_path)


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LAPE_KERNELS_CACHE", str(tmp_path))
    assert M.cache_root() == tmp_path
    assert corpus_dir() == tmp_path / "corpus"
    assert M.model_cache_dir("Gemma-3-270M") == tmp_path / "models" / "gemma3-270m"


# --------------------------------------------------------------------------------------------
# packaged models: GGUF assembly and one-time conversion
# --------------------------------------------------------------------------------------------


def test_assemble_gguf_from_wheels(tmp_path, monkeypatch):
    import hashlib

    chunks = [b"GGUF" + bytes(range(200)), bytes(range(100, 250)) * 3]
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    for i, data in enumerate(chunks):
        with zipfile.ZipFile(downloads / f"fake_part{i}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"fake_part{i}/data/m.gguf.part{i}", data)
    monkeypatch.setattr(M.subprocess, "run", lambda *a, **k: pytest.fail("no download expected"))
    spec = {"wheels": ["fake-part0==1.0", "fake-part1==1.0"],
            "files": ["fake_part0/data/m.gguf.part0", "fake_part1/data/m.gguf.part1"],
            "gguf_name": "m.gguf", "sha256": hashlib.sha256(b"".join(chunks)).hexdigest()}
    work = tmp_path / "work"
    work.mkdir()
    out = M._assemble_gguf(spec, work)
    assert out.read_bytes() == b"".join(chunks)
    with pytest.raises(RuntimeError, match="sha256"):
        M._assemble_gguf(dict(spec, sha256="0" * 64), work)
    assert not (work / "m.gguf").exists()


def test_packaged_model_converted_once(tmp_path, monkeypatch):
    calls = []

    def fake_assemble(spec, work):
        p = work / spec["gguf_name"]
        p.write_bytes(b"x")
        return p

    def fake_convert(gguf, out_dir, provenance):
        assert gguf.read_bytes() == b"x"
        calls.append(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / M._MARKER).write_text(json.dumps(provenance))

    monkeypatch.setattr(M, "_assemble_gguf", fake_assemble)
    monkeypatch.setattr(M, "_convert_gguf", fake_convert)
    half = M.model_cache_dir("smollm2", tmp_path)
    half.mkdir(parents=True)  # an interrupted conversion left files but no marker
    (half / "config.json").write_text("{}")
    d = M._ensure_packaged("smollm2-135m", tmp_path)
    assert d == half and calls == [half]
    assert json.loads((d / M._MARKER).read_text())["license"] == "Apache-2.0"
    assert M._ensure_packaged("smollm2-135m", tmp_path) == d and len(calls) == 1
    assert not list(tmp_path.glob(".gguf-*"))  # scratch GGUF removed


# --------------------------------------------------------------------------------------------
# slow: the real packaged models
# --------------------------------------------------------------------------------------------


def _perplexity(model, tok, text):
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


EN_TEXT = ("The committee met on Tuesday to discuss the budget for next year. After a long "
           "debate, the members agreed to increase funding for public libraries and schools.")
DE_TEXT = ("Der Ausschuss traf sich am Dienstag, um den Haushalt für das nächste Jahr zu "
           "besprechen. Nach einer langen Debatte einigten sich die Mitglieder darauf, die "
           "Mittel für öffentliche Bibliotheken und Schulen zu erhöhen.")


@pytest.mark.slow
@pytest.mark.parametrize("name,model_type,max_en,max_de", [
    ("gemma3-270m", "gemma3_text", 60.0, 200.0),
    ("smollm2-135m", "llama", 60.0, 2000.0),
])
def test_real_model_loads_with_sane_perplexity(name, model_type, max_en, max_de):
    model, tok = load_model(name)
    assert model.config.model_type == model_type
    assert (M.model_cache_dir(name) / M._MARKER).exists()
    vocab = model.config.vocab_size
    ppl_en, ppl_de = _perplexity(model, tok, EN_TEXT), _perplexity(model, tok, DE_TEXT)
    assert ppl_en < max_en and ppl_de < max_de and max(ppl_en, ppl_de) < vocab / 100
