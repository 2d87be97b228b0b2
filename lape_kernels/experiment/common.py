"""Shared plumbing of the CLI and the experiment: user-facing errors, atomic outputs, model and
corpus resolution, packing, device/dtype parsing, memory measurement.

Why one module: every subcommand must fail the same way (one line, non-zero exit, nothing
half-written at the output path), and every stage must see the same model, text and packing.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "ExperimentError",
    "Interrupted",
    "one_line",
    "partial_path",
    "atomic_dir",
    "write_atomic",
    "write_json_atomic",
    "read_json",
    "remove_path",
    "config_hash",
    "parse_device",
    "parse_dtype",
    "parse_autocast",
    "autocast",
    "load_model",
    "load_corpus",
    "corpus_texts",
    "pack",
    "PeakMemory",
    "progress",
    "no_param_grads",
    "eval_loss_chunk",
    "seed_everything",
]


class ExperimentError(Exception):
    """A failure the user can act on; the CLI prints it as one line and exits non-zero."""


class Interrupted(ExperimentError):
    """A run stopped on purpose (``--stop-after-steps``) after saving a resumable checkpoint."""

    exit_code = 3


def one_line(exc: BaseException) -> str:
    """``exc`` as a single line (messages of library errors sometimes span several)."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]  # KeyError's str() adds quotes
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    if not isinstance(exc, ExperimentError):
        text = f"{type(exc).__name__}: {text}"
    return text


# ----------------------------------------------------------------------------- outputs
def partial_path(path: Union[str, Path]) -> Path:
    """Where an output is built before it is renamed into place (hidden sibling; also the
    resume state of an interrupted ``collect`` / ``finetune``)."""
    path = Path(path)
    return path.parent / f".{path.name}.partial"


def remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` onto ``final`` (replacing an old output only now, at the very end)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() or final.is_symlink():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        remove_path(old)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_dir(final: Union[str, Path], *, keep_on_error: bool = False):
    """Yield a temporary sibling directory; on success it is renamed to ``final``.

    On an error the temporary directory is removed (or kept, for resumable state, when
    ``keep_on_error``), so ``final`` is either absent, the old output, or complete.
    """
    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        remove_path(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        if not keep_on_error:
            remove_path(tmp)
        raise
    _publish(tmp, final)


def write_atomic(path: Union[str, Path], data: Union[str, bytes]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default, allow_nan=True) + "\n"


def write_json_atomic(path: Union[str, Path], obj: Any) -> Path:
    return write_atomic(path, dumps(obj))


def read_json(path: Union[str, Path]) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExperimentError(f"{path} does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ExperimentError(f"{path}: cannot read JSON: {exc}") from None


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable hash of the settings that determine a result (resume refuses a different one)."""
    text = json.dumps(config, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- device / dtype
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def parse_device(name: Optional[str]) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N``."""
    name = (name or "auto").strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ExperimentError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ExperimentError(f"--device {name}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ExperimentError(f"--device {name}: only cpu and cuda are supported")
    return dev


def parse_dtype(name: Optional[str], device: torch.device, auto: Optional[torch.dtype] = None) -> torch.dtype:
    """The weights' dtype. ``auto``: ``auto`` if given, else float32 on CPU and bfloat16 on CUDA.

    Training and evaluation pass ``auto=float32``: an update of 1e-5 is below half a bfloat16
    ulp of most weights, so bfloat16 weights would silently drop (or hide) it; use
    ``--autocast bf16`` for bfloat16 matmuls over float32 weights instead.
    """
    name = (name or "auto").strip()
    if name == "auto":
        if auto is not None:
            return auto
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ExperimentError(f"--dtype {name!r} is not supported (use auto, float32, bfloat16, float16)")
    return _DTYPES[name]


def parse_autocast(name: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """Mixed precision for matmuls: ``auto`` (bfloat16 on CUDA, none on CPU), ``none``, ``bf16``, ``fp16``."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    table = {"none": None, "off": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ExperimentError(f"--autocast {name!r} is not supported (use auto, none, bf16, fp16)")
    return table[name]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` when ``dtype`` is set, else a no-op context."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def no_param_grads(model: torch.nn.Module):
    """Parameters temporarily ``requires_grad=False``: evaluation under ``no_grad`` then skips
    gradient work that autograd Functions decide from ``requires_grad`` (the chunked loss computes
    d(lm_head) in its forward whenever the head weight requires grad, grad mode or not)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def eval_loss_chunk(model: torch.nn.Module) -> int:
    """Tokens per chunk of the chunked LM loss for evaluation: about 64M logits (256 MiB fp32),
    so a 262k-vocabulary head streams its weight a few times per batch instead of once per
    32 tokens (2x faster on a 2-core CPU); memory is not the constraint when nothing trains."""
    head = getattr(model, "lm_head", None)
    vocab = head.weight.shape[0] if head is not None else 32000
    c = max(1, (1 << 26) // vocab)
    return 1 << (c.bit_length() - 1)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------- model / corpus
def load_model(spec: str, dtype: torch.dtype, device: torch.device, cache_dir: Optional[str] = None):
    """(model, tokenizer) for a model alias, local path or HF id, patchable by lape_kernels.

    Errors (unknown model, unsupported family, missing tokenizer) become ``ExperimentError``.
    """
    from .. import data
    from .. import introspection

    try:
        model, tokenizer = data.load_model(spec, dtype=dtype, device=device,
                                                  cache_dir=str(Path(cache_dir) / "models") if cache_dir else None)
    except ExperimentError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as exc:
        raise ExperimentError(f"cannot load model {spec!r}: {one_line(exc)}") from None
    if tokenizer is None:
        raise ExperimentError(f"model {spec!r} has no tokenizer")
    try:
        introspection.family_for(model)
        introspection.decoder_layers(model)
    except introspection.UnsupportedModelError as exc:
        raise ExperimentError(f"model {spec!r}: {exc}") from None
    model.eval()
    return model, tokenizer


BUILTIN = ("", "builtin")
_TEXT_SUFFIXES = (".txt", ".text", ".json", ".jsonl", ".csv", ".parquet")
PARALLEL_FILE = "parallel.jsonl"


def is_builtin(spec: Optional[str]) -> bool:
    return spec is None or spec in BUILTIN


def corpus_languages(spec: Optional[str]) -> List[str]:
    """Languages a corpus offers (built-in: those its sources ship; a directory: its
    ``<lang>/`` folders and ``<lang>.<ext>`` files)."""
    if is_builtin(spec):
        from ..data import available_languages

        return list(available_languages())
    if "{lang}" in str(spec):
        raise ExperimentError(f"corpus {spec!r} is a per-language template: name the languages")
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise ExperimentError(f"corpus {spec!r}: no such directory (a corpus is 'builtin', a directory with one "
                              f"entry per language, or a template containing {{lang}})")
    langs = []
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or child.name == PARALLEL_FILE:
            continue
        if child.is_dir() or child.suffix in _TEXT_SUFFIXES:
            langs.append(child.stem if child.is_file() else child.name)
    return langs


def _language_source(spec: str, lang: str) -> Optional[Path]:
    if "{lang}" in spec:
        p = Path(spec.replace("{lang}", lang)).expanduser()
        return p if p.exists() else None
    root = Path(spec).expanduser()
    if (root / lang).is_dir():
        return root / lang
    for suf in _TEXT_SUFFIXES:
        if (root / f"{lang}{suf}").is_file():
            return root / f"{lang}{suf}"
    return None


def load_corpus(spec: Optional[str], languages: Optional[Sequence[str]] = None,
                cache_dir: Optional[str] = None) -> Dict[str, Any]:
    """``language -> DatasetDict(train, validation)`` with a ``text`` column.

    ``spec``: ``None`` / ``builtin`` for the offline corpus that lape_kernels builds; a
    directory with one entry per language (``<lang>/``: a ``save_to_disk`` dataset or a folder
    of text files; or ``<lang>.txt|.jsonl|...``); or a path template containing ``{lang}``.
    Each language is read with ``lape_kernels.data.load_text_dataset`` (a validation split is
    carved from train when there is none). Unknown languages and empty splits are errors
    naming what is available.
    """
    languages = list(languages) if languages is not None else None
    if languages is not None:
        if not languages:
            raise ExperimentError("no languages given")
        dup = sorted({lang for lang in languages if languages.count(lang) > 1})
        if dup:
            raise ExperimentError(f"languages given twice: {', '.join(dup)}")
    name = "builtin" if is_builtin(spec) else str(spec)
    if languages is None:
        languages = corpus_languages(spec)
    if not is_builtin(spec) and "{lang}" not in str(spec):
        corpus_languages(spec)  # the directory must exist
    try:
        if is_builtin(spec):
            from ..data import available_languages, build_corpus

            available = list(available_languages())
            unknown = [lang for lang in languages if lang not in available]
            if unknown:
                raise ExperimentError(f"unknown language(s) {', '.join(unknown)} in the built-in corpus; "
                                      f"available: {', '.join(available)}")
            kwargs = {"cache_dir": str(Path(cache_dir) / "corpus")} if cache_dir else {}
            corpus = dict(build_corpus(languages=languages, **kwargs))
        else:
            from ..data import load_text_dataset

            corpus = {}
            unknown = []
            for lang in languages:
                src = _language_source(str(spec), lang)
                if src is None:
                    unknown.append(lang)
                    continue
                corpus[lang] = load_text_dataset(str(src), val_fraction=0.1)
            if unknown:
                have = ", ".join(corpus_languages(spec)) if "{lang}" not in str(spec) else "see the template"
                raise ExperimentError(f"unknown language(s) {', '.join(unknown)} in corpus {name!r}; available: "
                                      f"{have or 'none'}")
    except ExperimentError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ExperimentError(f"cannot load corpus {name!r}: {one_line(exc)}") from None
    if not corpus:
        raise ExperimentError(f"corpus {name!r} has no languages")
    for lang, dd in corpus.items():
        for split in ("train", "validation"):
            if split not in dd:
                raise ExperimentError(f"corpus {name!r}: language {lang!r} has no {split!r} split")
            if "text" not in dd[split].column_names:
                raise ExperimentError(f"corpus {name!r}: {lang}/{split} has no 'text' column")
            if not any(isinstance(t, str) and t.strip() for t in dd[split]["text"]):
                raise ExperimentError(f"corpus {name!r}: language {lang!r} has an empty {split} split")
    return corpus


def parallel_pairs(spec: Optional[str], lang: str, other: str, n: int,
                   cache_dir: Optional[str] = None) -> Tuple[List[str], List[str]]:
    """Up to ``n`` sentence pairs (``lang`` text, ``other`` text) that translate each other.

    Built-in corpus: ``lape_kernels.data.parallel_sentences``. A corpus directory: its
    ``parallel.jsonl`` (one JSON object per message, ``{language: text}``). Empty when none.
    """
    if is_builtin(spec):
        from ..data import parallel_sentences

        kwargs = {"cache_dir": str(Path(cache_dir) / "corpus")} if cache_dir else {}
        try:
            pairs = parallel_sentences(lang, other=other, n=n, split="validation", **kwargs)
            if len(pairs) < n:
                pairs = parallel_sentences(lang, other=other, n=n, **kwargs)
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            raise ExperimentError(f"no parallel sentences {lang}-{other}: {one_line(exc)}") from None
        return [a for a, _ in pairs], [b for _, b in pairs]
    if "{lang}" in str(spec):
        return [], []
    path = Path(spec).expanduser() / PARALLEL_FILE
    if not path.exists():
        return [], []
    a, b = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if isinstance(rec.get(lang), str) and isinstance(rec.get(other), str):
            a.append(rec[lang])
            b.append(rec[other])
            if len(a) >= n:
                break
    return a, b


def corpus_texts(corpus: Mapping[str, Any], lang: str, split: str) -> List[str]:
    """Non-empty texts of one split (in corpus order: deterministic)."""
    texts = [t for t in corpus[lang][split]["text"] if isinstance(t, str) and t.strip()]
    return texts


def pack(tokenizer: Any, texts: Sequence[str], seq_len: int, max_tokens: Optional[int] = None,
         what: str = "text") -> torch.Tensor:
    """Texts -> LongTensor ``[N, seq_len]`` of packed token ids (no padding). Empty -> error."""
    from ..data import pack_tokens

    if seq_len < 2:
        raise ExperimentError(f"--seq-len must be >= 2, got {seq_len}")
    if not texts:
        raise ExperimentError(f"{what}: no text (empty split)")
    ids = pack_tokens(tokenizer, list(texts), seq_len, add_bos=True, max_tokens=max_tokens)
    if ids.dim() != 2 or ids.shape[0] == 0:
        n_tok = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts[:1000])
        raise ExperimentError(f"{what}: too little text for one packed sequence of {seq_len} tokens "
                              f"(about {n_tok} tokens)")
    return ids


# ----------------------------------------------------------------------------- memory / progress
class PeakMemory:
    """Peak memory during a block: CUDA max allocated on GPU, else process RSS sampled by a
    background thread (every ``interval`` s) and at each ``sample()`` call."""

    def __init__(self, device: torch.device, interval: float = 0.01):
        self.device = device
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss"

    def _rss(self) -> int:
        import psutil

        return int(psutil.Process().memory_info().rss)

    def sample(self) -> None:
        if self.kind == "rss":
            self.peak = max(self.peak, self._rss())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "PeakMemory":
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.sample()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> int:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self.kind == "cuda_max_allocated":
            self.peak = max(self.peak, int(torch.cuda.max_memory_allocated(self.device)))
        else:
            self.sample()
        return self.peak


def progress(total: int, desc: str, unit: str = "tok", initial: int = 0):
    """A tqdm bar in tokens (tqdm shows tokens/s); hidden when stderr is not a terminal."""
    from tqdm.auto import tqdm

    disable = None if os.environ.get("LAPE_KERNELS_PROGRESS", "") != "1" else False
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, initial=initial, disable=disable,
                dynamic_ncols=True, leave=False)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def fmt_bytes(n: Optional[float]) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def now() -> float:
    return time.perf_counter()
