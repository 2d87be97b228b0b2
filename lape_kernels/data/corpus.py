"""Offline multilingual corpus built from translations shipped in Debian and PyPI packages.

Why these sources: LAPE statistics and perplexity need real sentences in many languages, and
the only things reachable here are package registries. The sources (``sources/``: GNOME help,
Firefox language packs, Django catalogs) are all translations of one English original, so
every segment has a source id that aligns it with English.

Packages are fetched once into the cache (``apt-get download``, ``pip download --no-deps``),
parsed straight from the archives, and the per-(source, language) segments are cached as JSON.
``build_corpus`` filters (untranslated, too short, not prose, duplicates), splits by a hash of the
source id (the same ids land in validation for every language, so validation sets are
parallel), and saves one ``DatasetDict`` per language plus a JSON manifest.

Cache layout (FORMAT_VERSION 2; existing caches stay valid only while it is unchanged)::

    <corpus_dir>/downloads/                   the fetched .deb and .whl files
    <corpus_dir>/segments/<source>/v2/<package>_<version>/<lang>[.en-gb_<version>].json
    <corpus_dir>/built/<key>/<lang>/          save_to_disk DatasetDict + .complete marker
    <corpus_dir>/built/<key>/manifest.json    key = hash of (format, sources, filter params)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Mapping, Sequence

from .atomic import atomic_dir, write_json_atomic
from .errors import CorpusSourceError
from .models import cache_root
from .sources import Segments, TextSource, canonical_lang, check_sources
from .splits import dedup_and_split, split_of
from .text import has_placeholder, looks_like_prose, strip_markup

__all__ = [
    "DEFAULT_LANGUAGES",
    "FORMAT_VERSION",
    "available_languages",
    "build_corpus",
    "corpus_dir",
    "corpus_manifest",
    "filter_segments",
    "parallel_sentences",
]

FORMAT_VERSION = 2

#: English + high-resource references + under-resourced targets that the sources cover well.
DEFAULT_LANGUAGES = (
    "en", "de", "fr", "es", "ru",
    "gl", "cy", "eu", "is", "ga", "ka", "mk", "ne", "af", "lv", "sl",
)


def available_languages(sources: Sequence[str] | None = None) -> list[str]:
    """Languages that at least one of `sources` (default all) ships."""
    return _languages_of(check_sources(sources))


def _languages_of(srcs: Sequence[TextSource]) -> list[str]:
    return sorted({lang for s in srcs for lang in s.languages})


def _check_langs(languages) -> list[str]:
    """Canonical codes (see canonical_lang), first occurrence kept; None = DEFAULT_LANGUAGES."""
    if languages is None:
        return list(DEFAULT_LANGUAGES)
    if isinstance(languages, str):
        languages = [languages]
    langs = [canonical_lang(x) for x in languages]
    if not langs:
        raise ValueError("languages must not be empty")
    return list(dict.fromkeys(langs))


def corpus_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Corpus cache: `cache_dir`, else $LAPE_KERNELS_CACHE/corpus, else ~/.cache/lape_kernels/corpus."""
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "corpus"


def _built_dir(root: Path, srcs: Sequence[TextSource], min_chars: int, val_fraction: float,
               seed: int) -> Path:
    """One directory per (format, sources, filter parameters): a build with other parameters
    never reads or overwrites this one."""
    params = [FORMAT_VERSION, sorted(s.name for s in srcs), min_chars, val_fraction, seed]
    return root / "built" / hashlib.sha256(json.dumps(params).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# segments of one source, cached
# --------------------------------------------------------------------------------------------

def filter_segments(
    segments: Mapping[str, tuple[str, str | None]],
    *,
    lang: str,
    english_texts: set[str] | frozenset = frozenset(),
    min_chars: int = 30,
) -> dict[str, str]:
    """uid -> clean text: markup stripped; untranslated (identical to its English source, or to
    any English string of the source when unaligned), placeholder-bearing and non-prose
    segments removed. For lang 'en' nothing is 'untranslated'."""
    out = {}
    for uid, (text, eng) in segments.items():
        clean = strip_markup(text)
        if lang != "en":
            if eng is not None and clean == strip_markup(eng):
                continue
            if clean in english_texts:
                continue
        if has_placeholder(clean) or not looks_like_prose(clean, min_chars):
            continue
        out[uid] = clean
    return out


@dataclass
class _SourceText:
    """What one source gave for some languages: lang -> segments, lang -> provenance."""

    source: TextSource
    segments: dict[str, Segments]
    provenance: dict[str, dict]

    @cached_property
    def english_texts(self) -> set[str]:
        """Every English string of the source, markup stripped: a translation equal to one of
        them was left untranslated, even where it aligns with nothing."""
        return {strip_markup(t) for t, _ in self.segments.get("en", {}).values()}

    def kept(self, lang: str, min_chars: int) -> dict[str, str]:
        """uid -> clean text of `lang` that passes ``filter_segments``."""
        return filter_segments(self.segments.get(lang, {}), lang=lang,
                               english_texts=self.english_texts, min_chars=min_chars)


def _source_text(source: TextSource, langs: Sequence[str], root: Path) -> _SourceText:
    """The segments of `langs` (those `source` ships and could fetch), read from the packages
    once and then from the JSON cache of each (package version, language)."""
    langs = [lang for lang in langs if lang in source.languages]
    packages = source.fetch(langs, root / "downloads") if langs else {}
    langs = [lang for lang in langs if lang in packages]
    cache = root / "segments" / source.name / f"v{FORMAT_VERSION}"
    segments: dict[str, Segments] = {}
    todo = []
    for lang in langs:
        cached = cache / source.segments_file(lang, packages[lang])
        if cached.exists():
            segments[lang] = {k: tuple(v) for k, v in json.loads(cached.read_text("utf-8")).items()}
        else:
            todo.append(lang)
    if todo:
        parsed = source.read(packages, todo)
        for lang in todo:
            segments[lang] = parsed.get(lang, {})
            write_json_atomic(cache / source.segments_file(lang, packages[lang]), segments[lang])
    provenance = {lang: source.provenance(packages[lang]) for lang in langs}
    return _SourceText(source, segments, provenance)


# --------------------------------------------------------------------------------------------
# the built corpus
# --------------------------------------------------------------------------------------------

def build_corpus(
    languages: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    min_chars: int = 30,
    val_fraction: float = 0.1,
    seed: int = 0,
    sources: Sequence[str] | None = None,
    rebuild: bool = False,
):
    """lang -> DatasetDict(train, validation) with columns text, id, source.

    `languages`: codes like 'cy', 'pt_BR' (default DEFAULT_LANGUAGES; "all" = every language
    a source ships — downloads ~100 language packs). Built once into the cache (fetching the
    packages on first use), then loaded from disk; `rebuild=True` rebuilds the datasets from the
    cached segments.
    Provenance (package, version, licence) goes into each Dataset's info and into
    ``manifest.json`` beside the built datasets.
    """
    from datasets import load_from_disk

    srcs = check_sources(sources)
    langs = _languages_of(srcs) if languages == "all" else _check_langs(languages)
    if not isinstance(min_chars, int) or min_chars < 1:
        raise ValueError(f"min_chars must be a positive int, got {min_chars!r}")
    if not (0.0 <= val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    unknown = [lang for lang in langs if lang not in _languages_of(srcs)]
    if unknown:
        raise ValueError(f"no source in {[s.name for s in srcs]} ships languages {unknown}; "
                         f"available: {_languages_of(srcs)}")
    root = corpus_dir(cache_dir)
    built = _built_dir(root, srcs, min_chars, val_fraction, seed)
    missing = [lang for lang in langs if rebuild or not (built / lang / ".complete").exists()]
    if missing:
        texts = [_source_text(s, sorted(set(missing) | {"en"}), root) for s in srcs]
        manifest_path = built / "manifest.json"
        manifest = json.loads(manifest_path.read_text("utf-8")) if manifest_path.exists() else {}
        manifest.update({"format_version": FORMAT_VERSION, "sources": [s.name for s in srcs],
                         "params": {"min_chars": min_chars, "val_fraction": val_fraction,
                                    "seed": seed}})
        with _quiet_datasets():
            for lang in missing:
                entry = _build_language(lang, texts, built / lang, min_chars, val_fraction, seed)
                manifest.setdefault("languages", {})[lang] = entry
                write_json_atomic(manifest_path, manifest)
    return {lang: load_from_disk(str(built / lang)) for lang in langs}


@contextlib.contextmanager
def _quiet_datasets():
    """No per-language 'Saving the dataset' progress bars."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def _build_language(lang: str, texts: Sequence[_SourceText], out_dir: Path, min_chars: int,
                    val_fraction: float, seed: int) -> dict:
    """Filter, dedup and split the text of `lang`, save it to `out_dir` (all or nothing), and
    return its manifest entry."""
    from datasets import Dataset, DatasetDict, DatasetInfo, Features, Value

    rows = []
    used = []
    for st in texts:
        if lang not in st.segments:
            continue
        kept = st.kept(lang, min_chars)
        rows.extend((st.source.name, uid, text) for uid, text in kept.items())
        used.append(dict(st.provenance[lang], segments_kept=len(kept),
                         segments_total=len(st.segments[lang])))
    splits = dedup_and_split(rows, val_fraction, seed)
    if not splits["train"]:
        raise CorpusSourceError(f"no usable text for language {lang!r} in "
                                f"{[st.source.name for st in texts]}")
    licenses = " AND ".join(sorted({u["license"] for u in used}))
    desc = (f"lape_kernels offline corpus, language {lang}: translated segments from "
            + "; ".join(f"{u['package']} {u['version']} ({u['origin']}, {u['license']}, "
                        f"{u['segments_kept']} segments)" for u in used)
            + f". Untranslated, non-prose and duplicate segments removed; split by "
              f"sha256(seed={seed}, source id) with val_fraction={val_fraction}.")
    features = Features({"text": Value("string"), "id": Value("string"), "source": Value("string")})
    dd = DatasetDict({
        split: Dataset.from_list(split_rows, features=features, info=DatasetInfo(
            description=desc, license=licenses, features=features,
            homepage=" ".join(u["homepage"] for u in used),
            dataset_name="lape_kernels_corpus", config_name=lang))
        for split, split_rows in splits.items()
    })
    with atomic_dir(out_dir) as tmp:
        dd.save_to_disk(str(tmp))
        (tmp / ".complete").write_text("ok\n")
    return {
        "sources": used,
        "license": licenses,
        "rows": {k: len(v) for k, v in splits.items()},
        "chars": {k: sum(len(r["text"]) for r in v) for k, v in splits.items()},
    }


def corpus_manifest(cache_dir: str | os.PathLike | None = None, min_chars: int = 30,
                    val_fraction: float = 0.1, seed: int = 0,
                    sources: Sequence[str] | None = None) -> dict:
    """The manifest written by ``build_corpus`` with the same parameters ({} if not built)."""
    srcs = check_sources(sources)
    p = _built_dir(corpus_dir(cache_dir), srcs, min_chars, val_fraction, seed) / "manifest.json"
    return json.loads(p.read_text("utf-8")) if p.exists() else {}


# --------------------------------------------------------------------------------------------
# parallel sentences
# --------------------------------------------------------------------------------------------

def parallel_sentences(
    lang: str,
    other: str = "en",
    n: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    min_chars: int = 30,
    sources: Sequence[str] | None = None,
    split: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> list[tuple[str, str]]:
    """Pairs (text in `lang`, text in `other`) that translate the same source message.

    Both sides pass the corpus filters (so neither is an untranslated copy of the English).
    Pairs are ordered by a hash of the source id (a spread sample, not one file); `n` takes the
    first n. `split` ('train'/'validation') keeps only ids of that split.
    """
    lang, other = canonical_lang(lang), canonical_lang(other)
    if lang == other:
        raise ValueError(f"lang and other must differ, both are {lang!r}")
    if n is not None and (not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be a non-negative int or None, got {n!r}")
    if split not in (None, "train", "validation"):
        raise ValueError(f"split must be None, 'train' or 'validation', got {split!r}")
    srcs = check_sources(sources)
    root = corpus_dir(cache_dir)
    for x in (lang, other):
        if x not in _languages_of(srcs):
            raise ValueError(f"no source in {[s.name for s in srcs]} ships language {x!r}")
    pairs = []
    for s in srcs:
        if lang not in s.languages or other not in s.languages:
            continue
        st = _source_text(s, sorted({lang, other, "en"}), root)
        a, b = st.kept(lang, min_chars), st.kept(other, min_chars)
        for uid in a.keys() & b.keys():
            if not s.aligned(uid):
                continue
            sid = f"{s.name}:{uid}"
            if split is not None and split_of(sid, val_fraction, seed) != split:
                continue
            pairs.append((hashlib.sha256(sid.encode()).hexdigest(), a[uid], b[uid]))
    pairs.sort()
    seen, out = set(), []
    for _, x, y in pairs:
        if (x, y) in seen:
            continue
        seen.add((x, y))
        out.append((x, y))
        if n is not None and len(out) >= n:
            break
    return out
