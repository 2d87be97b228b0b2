"""The corpus pipeline: filters, hash splits, build/cache/manifest and parallel sentences on
synthetic packages (no network), plus a slow build from the real packages."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from lape_kernels.data import build_corpus, corpus_manifest, parallel_sentences
from lape_kernels.data.corpus import FORMAT_VERSION, corpus_dir, filter_segments
from lape_kernels.data.sources import DJANGO_VERSION
from lape_kernels.data.splits import dedup_and_split, split_of

# --------------------------------------------------------------------------------------------
# filters and splits
# --------------------------------------------------------------------------------------------


def test_filter_segments():
    segs = {
        "a": ("Mae hwn yn frawddeg Gymraeg dda iawn.", "This is a very good Welsh sentence."),
        "b": ("This sentence was left untranslated.", "This sentence was left untranslated."),
        "c": ("Also <b>left</b> in English, unaligned!", None),
        "d": ("Byr iawn.", "Very short."),
        "e": ("Agor %S mewn ffenest newydd nawr os gwelwch yn dda", "Open %S in a new window"),
    }
    eng = {"Also left in English, unaligned!"}
    got = filter_segments(segs, lang="cy", english_texts=eng, min_chars=20)
    assert got == {"a": "Mae hwn yn frawddeg Gymraeg dda iawn."}
    got_en = filter_segments(segs, lang="en", english_texts=eng, min_chars=20)
    assert set(got_en) == {"a", "b", "c"}


def test_split_is_a_stable_hash_of_the_id():
    ids = [f"firefox:file.ftl:msg-{i}" for i in range(4000)]
    splits = [split_of(i, 0.1) for i in ids]
    assert splits == [split_of(i, 0.1) for i in ids]
    frac = splits.count("validation") / len(ids)
    assert 0.08 < frac < 0.12
    assert splits != [split_of(i, 0.1, seed=1) for i in ids]
    assert all(split_of(i, 0.0) == "train" for i in ids[:50])
    # dedup keeps the first id in sorted order; row order does not matter
    rows = [("s", "b", "same text"), ("s", "a", "same text"), ("s", "c", "other text")]
    a = dedup_and_split(rows, 0.5, 0)
    b = dedup_and_split(list(reversed(rows)), 0.5, 0)
    assert a == b
    kept = sorted(r["id"] for v in a.values() for r in v)
    assert kept == ["s:a", "s:c"]


def test_split_of_pins_the_hash():
    # the split of an id is part of the cache format: built corpora and their validation sets
    # must not move when the code moves
    h = hashlib.sha256("0\x00firefox:a".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2.0**64
    assert split_of("firefox:a", u + 1e-9) == "validation"
    assert split_of("firefox:a", u - 1e-9) == "train"


# --------------------------------------------------------------------------------------------
# the whole corpus pipeline on synthetic packages
# --------------------------------------------------------------------------------------------


def test_build_corpus_on_synthetic_packages(fake_cache):
    corpus = build_corpus(["cy", "gl", "en"], cache_dir=fake_cache, min_chars=20, val_fraction=0.3)
    assert list(corpus) == ["cy", "gl", "en"]
    texts = {lang: sorted(t for s in dd.values() for t in s["text"]) for lang, dd in corpus.items()}
    assert texts["cy"] == sorted([
        "Mae Firefox yn cadw eich hanes pori yn breifat ar y cyfrifiadur hwn.",
        "Nid oes modd dangos y dudalen rydych yn ceisio ei gweld ar hyn o bryd.",
        "Rhowch gyfeiriad e-bost dilys, os gwelwch yn dda.",
    ])
    assert texts["gl"] == sorted([
        "Primeiros pasos co escritorio",
        "Abra a vista de Actividades e comece a escribir.",
        "Os seus ficheiros gárdanse no computador ata que os elimine.",
        "Firefox mantén o seu historial de navegación privado neste computador.",
        "Imprimir un documento en papel",
        "Escolla Imprimir no menú do aplicativo.",
    ])
    assert "gnome-help:gnome-help/b.page#u1" in [i for s in corpus["gl"].values() for i in s["id"]]
    assert "This paragraph is never translated by anyone at all." in texts["en"]
    assert "This string stays in English for every locale here." in texts["en"]
    assert "Enter a valid email address, please." in texts["en"]
    for lang, dd in corpus.items():
        assert set(dd) == {"train", "validation"}
        for split, ds in dd.items():
            assert ds.column_names == ["text", "id", "source"]
            assert all(split_of(i, 0.3) == split for i in ds["id"])
            assert "MPL-2.0" in ds.info.license and "firefox-esr-l10n" in ds.info.description
    gl_ids = [i for s in corpus["gl"].values() for i in s["id"]]
    assert "gnome-help:gnome-help/a.page#0" in gl_ids
    assert "gnome-help:gnome-help/a.page#2" in gl_ids
    assert "gnome-help:gnome-help/a.page#3" not in gl_ids  # duplicate of #2 dropped
    assert "gnome-help:gnome-help/a.page#4" not in gl_ids  # left in English

    man = corpus_manifest(fake_cache, min_chars=20, val_fraction=0.3)
    cy = man["languages"]["cy"]
    assert {(s["package"], s["version"], s["license"]) for s in cy["sources"]} == {
        ("firefox-esr-l10n-cy", "153.0esr-1", "MPL-2.0"),
        ("django", DJANGO_VERSION, "BSD-3-Clause")}
    assert sum(cy["rows"].values()) == 3
    assert man["params"] == {"min_chars": 20, "val_fraction": 0.3, "seed": 0}

    # second call is served from the cache: identical content
    again = build_corpus(["cy"], cache_dir=fake_cache, min_chars=20, val_fraction=0.3)
    assert again["cy"]["train"]["id"] == corpus["cy"]["train"]["id"]


def test_corpus_cache_layout_is_stable(fake_cache):
    """Where segments, datasets and the manifest live is part of the cache format: existing
    caches (~/.cache/lape_kernels) must keep working, so the layout is pinned here."""
    assert FORMAT_VERSION == 2
    build_corpus(["cy", "gl"], cache_dir=fake_cache, min_chars=20, val_fraction=0.3)
    segments = fake_cache / "segments"
    files = sorted(str(p.relative_to(segments)) for p in segments.rglob("*.json"))
    assert files == [
        f"django/v2/django_{DJANGO_VERSION}/cy.json",
        f"django/v2/django_{DJANGO_VERSION}/en.json",
        f"django/v2/django_{DJANGO_VERSION}/gl.json",  # Django ships gl; this wheel has no text
        "firefox/v2/firefox-esr-l10n-cy_153.0esr-1/cy.en-gb_153.0esr-1.json",
        "firefox/v2/firefox-esr-l10n-en-gb_153.0esr-1/en.en-gb_153.0esr-1.json",
        "firefox/v2/firefox-esr-l10n-gl_153.0esr-1/gl.en-gb_153.0esr-1.json",
        "gnome-help/v2/gnome-user-docs_43.0-2/en.json",
        "gnome-help/v2/gnome-user-docs_43.0-2/gl.json",
    ]
    assert json.loads((segments / files[2]).read_text("utf-8")) == {}
    cached = json.loads((segments / files[3]).read_text("utf-8"))
    assert cached["browser/localization/{loc}/browser/test.ftl:label"] == ["Gosodiadau", "Settings"]
    key = hashlib.sha256(json.dumps([2, ["django", "firefox", "gnome-help"], 20, 0.3, 0])
                         .encode()).hexdigest()[:12]
    built = fake_cache / "built" / key
    assert sorted(p.name for p in built.iterdir()) == ["cy", "gl", "manifest.json"]
    assert (built / "cy" / ".complete").read_text() == "ok\n"
    assert json.loads((built / "manifest.json").read_text("utf-8"))["sources"] == [
        "gnome-help", "firefox", "django"]
    man = json.loads((built / "manifest.json").read_text("utf-8"))["languages"]["cy"]
    firefox = next(s for s in man["sources"] if s["source"] == "firefox")
    assert firefox == {
        "source": "firefox", "package": "firefox-esr-l10n-cy", "version": "153.0esr-1",
        "origin": "debian", "license": "MPL-2.0", "homepage": "https://hg.mozilla.org/l10n-central",
        "file": "firefox-esr-l10n-cy_153.0esr-1_all.deb", "segments_kept": 2, "segments_total": 4,
        "english_reference": {"package": "firefox-esr-l10n-en-gb", "version": "153.0esr-1"}}


def test_corpus_reads_segments_from_the_cache(fake_cache):
    """Once cached, a (source, package version, language) is never parsed again: an edited
    segment file is what the next build uses (rebuild=True rebuilds from the cached segments)."""
    build_corpus(["cy"], cache_dir=fake_cache, min_chars=20, val_fraction=0.3)
    seg = (fake_cache / "segments" / "django" / "v2" / f"django_{DJANGO_VERSION}" / "cy.json")
    seg.write_text(json.dumps({"x|y": ["Brawddeg newydd sbon o'r storfa segmentau.", "y"]}))
    corpus = build_corpus(["cy"], cache_dir=fake_cache, min_chars=20, val_fraction=0.3,
                          rebuild=True)
    texts = [t for s in corpus["cy"].values() for t in s["text"]]
    assert "Brawddeg newydd sbon o'r storfa segmentau." in texts
    assert "Rhowch gyfeiriad e-bost dilys, os gwelwch yn dda." not in texts


def test_build_corpus_is_deterministic_across_caches(fake_cache, tmp_path):
    other = tmp_path / "copy"
    shutil.copytree(fake_cache / "downloads", other / "downloads")
    a = build_corpus(["cy", "gl"], cache_dir=fake_cache, min_chars=20, val_fraction=0.5, seed=7)
    b = build_corpus(["gl", "cy"], cache_dir=other, min_chars=20, val_fraction=0.5, seed=7)
    for lang in ("cy", "gl"):
        for split in ("train", "validation"):
            assert a[lang][split].to_list() == b[lang][split].to_list()


def test_parallel_sentences_synthetic(fake_cache):
    pairs = parallel_sentences("cy", cache_dir=fake_cache, min_chars=20)
    assert sorted(pairs) == sorted([
        ("Mae Firefox yn cadw eich hanes pori yn breifat ar y cyfrifiadur hwn.",
         "Firefox keeps your browsing history private on this computer."),
        ("Nid oes modd dangos y dudalen rydych yn ceisio ei gweld ar hyn o bryd.",
         "The page you are trying to view cannot be shown right now."),
        ("Rhowch gyfeiriad e-bost dilys, os gwelwch yn dda.", "Enter a valid email address, please."),
    ])
    assert pairs == parallel_sentences("cy", cache_dir=fake_cache, min_chars=20)
    assert len(parallel_sentences("cy", n=2, cache_dir=fake_cache, min_chars=20)) == 2
    gl_cy = parallel_sentences("gl", "cy", cache_dir=fake_cache, min_chars=20)
    assert gl_cy == [("Firefox mantén o seu historial de navegación privado neste computador.",
                      "Mae Firefox yn cadw eich hanes pori yn breifat ar y cyfrifiadur hwn.")]
    gl = parallel_sentences("gl", cache_dir=fake_cache, min_chars=20, sources=["gnome-help"])
    assert ("Abra a vista de Actividades e comece a escribir.",
            "Open the Activities overview and start typing.") in gl
    assert not any("Imprimir" in a for a, _ in gl)  # unaligned page gives no pairs
    with pytest.raises(ValueError, match="differ"):
        parallel_sentences("en", "en", cache_dir=fake_cache)
    with pytest.raises(ValueError, match="split"):
        parallel_sentences("cy", split="test", cache_dir=fake_cache)
    with pytest.raises(ValueError, match="n must"):
        parallel_sentences("cy", n=-1, cache_dir=fake_cache)


def test_parallel_sentences_split_partitions_the_pairs(fake_cache):
    kw = dict(cache_dir=fake_cache, min_chars=20, val_fraction=0.5, seed=3)
    every = parallel_sentences("cy", **kw)
    train = parallel_sentences("cy", split="train", **kw)
    val = parallel_sentences("cy", split="validation", **kw)
    assert sorted(train + val) == sorted(every) and not set(train) & set(val)
    with pytest.raises(ValueError, match="ships language 'xx'"):
        parallel_sentences("xx", cache_dir=fake_cache)


def test_build_corpus_errors(fake_cache):
    with pytest.raises(ValueError, match="no source"):
        build_corpus(["xx"], cache_dir=fake_cache)
    with pytest.raises(ValueError, match="val_fraction"):
        build_corpus(["cy"], cache_dir=fake_cache, val_fraction=1.0)
    with pytest.raises(ValueError, match="min_chars"):
        build_corpus(["cy"], cache_dir=fake_cache, min_chars=0)
    with pytest.raises(ValueError, match="sources"):
        build_corpus(["cy"], cache_dir=fake_cache, sources=["wikipedia"])
    with pytest.raises(ValueError, match="language code"):
        build_corpus(["c y"], cache_dir=fake_cache)


def test_corpus_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LAPE_KERNELS_CACHE", str(tmp_path))
    assert corpus_dir() == tmp_path / "corpus"
    assert corpus_dir(tmp_path / "elsewhere") == tmp_path / "elsewhere"
    assert corpus_manifest(tmp_path / "empty") == {}


# --------------------------------------------------------------------------------------------
# slow: the real packages
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_corpus_build():
    corpus = build_corpus()
    assert len(corpus) >= 12
    man = corpus_manifest()
    for lang, dd in corpus.items():
        assert len(dd["train"]) > 500, lang
        assert man["languages"][lang]["license"]
        assert all(s["version"] for s in man["languages"][lang]["sources"])
    en = set(corpus["en"]["train"]["text"])
    for lang in ("cy", "eu", "gl", "ka"):
        assert len(set(corpus[lang]["train"]["text"]) & en) < 0.01 * len(corpus[lang]["train"])
    pairs = parallel_sentences("cy", n=200)
    assert len(pairs) == 200 and all(a != b for a, b in pairs)
