"""What a stage reads: the model (alias, local path or HF id), the corpus (built-in, a directory,
or a ``{lang}`` template), parallel sentences, and the text packed into fixed-length token rows.

Why one module: every stage must see the same model, the same text and the same packing, and
fail on a bad input with the same one-line ``ExperimentError``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .errors import ExperimentError, one_line, reworded

__all__ = ["load_model", "model_intermediate_size", "load_corpus", "corpus_languages", "parallel_pairs",
           "corpus_texts", "pack", "pack_split", "pack_validation", "validation_digests", "is_builtin", "PARALLEL_FILE"]

BUILTIN = ("", "builtin")
_TEXT_SUFFIXES = (".txt", ".text", ".json", ".jsonl", ".csv", ".parquet")
PARALLEL_FILE = "parallel.jsonl"


# ----------------------------------------------------------------------------- model
def _models_cache(cache_dir: Optional[str]) -> Optional[str]:
    return str(Path(cache_dir) / "models") if cache_dir else None


def _corpus_cache(cache_dir: Optional[str]) -> Dict[str, str]:
    return {"cache_dir": str(Path(cache_dir) / "corpus")} if cache_dir else {}


def load_model(spec: str, dtype: torch.dtype, device: torch.device, cache_dir: Optional[str] = None):
    """(model, tokenizer) for a model alias, local path or HF id, patchable by lape_kernels.

    Errors (unknown model, unsupported family, missing tokenizer) become ``ExperimentError``.
    """
    from .. import data
    from .. import introspection

    with reworded(f"cannot load model {spec!r}", OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError):
        model, tokenizer = data.load_model(spec, dtype=dtype, device=device, cache_dir=_models_cache(cache_dir))
    if tokenizer is None:
        raise ExperimentError(f"model {spec!r} has no tokenizer")
    try:
        introspection.discover(model)  # patchable: dense MLPs and/or experts found and proven
        introspection.decoder_layers(model)
    except introspection.UnsupportedModelError as exc:
        raise ExperimentError(f"model {spec!r}: {exc}") from None
    model.eval()
    return model, tokenizer


def model_intermediate_size(spec: str, cache_dir: Optional[str]) -> Optional[int]:
    """The MLP width from the model's config alone (no weights), or None when not at hand."""
    from ..introspection import model_shape

    candidates = []
    try:
        from ..data import model_cache_dir

        candidates.append(model_cache_dir(spec, _models_cache(cache_dir)))
    except ValueError:
        pass
    candidates.append(Path(spec).expanduser())
    for c in candidates:
        if (c / "config.json").exists():
            try:
                from transformers import AutoConfig

                return model_shape(AutoConfig.from_pretrained(str(c)))[1]
            except Exception:  # noqa: BLE001 - unknown here; checked against the model later
                return None
    try:
        from transformers import AutoConfig

        return model_shape(AutoConfig.from_pretrained(spec, local_files_only=True))[1]
    except Exception:  # noqa: BLE001
        return None


# ----------------------------------------------------------------------------- corpus
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


def _read_corpus(spec: Optional[str], name: str, languages: List[str], cache_dir: Optional[str]) -> Dict[str, Any]:
    if is_builtin(spec):
        from ..data import available_languages, build_corpus

        available = list(available_languages())
        unknown = [lang for lang in languages if lang not in available]
        if unknown:
            raise ExperimentError(f"unknown language(s) {', '.join(unknown)} in the built-in corpus; "
                                  f"available: {', '.join(available)}")
        return dict(build_corpus(languages=languages, **_corpus_cache(cache_dir)))
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
    return corpus


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
    from ..languages import check_languages

    if languages is not None:
        try:
            languages = check_languages(list(languages))
        except (TypeError, ValueError) as exc:
            raise ExperimentError(f"--languages: {exc}") from None
    name = "builtin" if is_builtin(spec) else str(spec)
    if languages is None:
        languages = corpus_languages(spec)
    if not is_builtin(spec) and "{lang}" not in str(spec):
        corpus_languages(spec)  # the directory must exist
    with reworded(f"cannot load corpus {name!r}", OSError, ValueError, KeyError, TypeError, RuntimeError):
        corpus = _read_corpus(spec, name, languages, cache_dir)
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

        kwargs = _corpus_cache(cache_dir)
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
    return [t for t in corpus[lang][split]["text"] if isinstance(t, str) and t.strip()]


# ----------------------------------------------------------------------------- packing
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


def pack_split(tokenizer: Any, corpus: Mapping[str, Any], lang: str, split: str, seq_len: int,
               max_tokens: Optional[int] = None) -> torch.Tensor:
    """One language's split, packed (the error names the language and the split)."""
    return pack(tokenizer, corpus_texts(corpus, lang, split), seq_len, max_tokens=max_tokens,
                what=f"language {lang!r} {split} split")


def validation_digests(corpus: Mapping[str, Any], languages: Sequence[str]) -> Dict[str, str]:
    """The content digest of each language's validation text (what an evaluation measured)."""
    from ..files import text_digest

    return {lang: text_digest(corpus_texts(corpus, lang, "validation")) for lang in languages}


def pack_validation(tokenizer: Any, corpus: Mapping[str, Any], languages: Sequence[str], seq_len: int,
                    val_tokens: int) -> Dict[str, torch.Tensor]:
    """The first ``val_tokens`` tokens of each language's validation split, packed."""
    return {lang: pack_split(tokenizer, corpus, lang, "validation", seq_len, val_tokens) for lang in languages}
