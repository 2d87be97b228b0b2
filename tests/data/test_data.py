"""Tests for lape_kernels.data: tiny models, packing, corpus parsers and the corpus pipeline on
synthetic packages (no network), plus slow tests on the real packages and models."""

from __future__ import annotations

import io
import json
import math
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lape_kernels.data import corpus as C
from lape_kernels.data import models as M
from lape_kernels.data import (
    build_corpus,
    corpus_manifest,
    iter_packed_batches,
    load_model,
    load_text_dataset,
    pack_tokens,
    parallel_sentences,
    tiny_model,
    tiny_tokenizer,
)

# --------------------------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", M.TINY_FAMILIES)
def test_tiny_model_forward_backward(family):
    model = tiny_model(family)
    assert model.config.model_type == family
    assert model.config.hidden_size == 64 and model.config.intermediate_size == 128
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 256
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 12, 256)
    assert torch.isfinite(out.logits).all()
    # a random model is near uniform over the vocabulary
    assert abs(out.loss.item() - math.log(256)) < 1.0
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3"])
def test_tiny_model_deterministic_and_rng_neutral(family):
    state = torch.random.get_rng_state()
    a, b = tiny_model(family, seed=3), tiny_model(family, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = tiny_model(family, seed=4)
    assert any(not torch.equal(sa[k], c.state_dict()[k]) for k in sa)


def test_tiny_model_overrides_and_errors():
    m = tiny_model("qwen3", num_hidden_layers=3, intermediate_size=96)
    assert m.config.num_hidden_layers == 3
    assert m.model.layers[0].mlp.gate_proj.weight.shape == (96, 64)
    assert tiny_model("phi3").model.layers[0].mlp.gate_up_proj.weight.shape == (256, 64)
    assert tiny_model("gemma", dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="family must be one of"):
        tiny_model("gpt2")


def test_tiny_tokenizer_roundtrip():
    tok = tiny_tokenizer()
    ids = tok("Hi there!")["input_ids"]
    assert ids[0] == tok.bos_token_id == 1
    assert len(ids) == 1 + len("Hi there!")
    assert tok.decode(ids, skip_special_tokens=True) == "Hi there!"
    assert tok("é", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 2)
    assert max(tok.get_vocab().values()) < 256
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_tokenizer(50)


# --------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------


def _reference_pack(docs, seq_len, add_bos, bos, eos, max_tokens=None):
    stream = [t for d in docs for t in list(d) + [eos]]
    body = seq_len - (1 if add_bos else 0)
    rows = [([bos] if add_bos else []) + stream[i:i + body]
            for i in range(0, len(stream) - body + 1, body)]
    if max_tokens is not None:
        rows = rows[: max_tokens // seq_len]
    return rows


@settings(max_examples=60, deadline=None)
@given(
    docs=st.lists(st.lists(st.integers(3, 99), max_size=20), max_size=12),
    seq_len=st.integers(2, 9),
    add_bos=st.booleans(),
    max_tokens=st.one_of(st.none(), st.integers(0, 120)),
    batch_size=st.integers(1, 4),
)
def test_pack_tokens_matches_reference(docs, seq_len, add_bos, max_tokens, batch_size):
    got = pack_tokens(None, docs, seq_len, add_bos, max_tokens, bos_id=1, eos_id=2)
    want = _reference_pack(docs, seq_len, add_bos, 1, 2, max_tokens)
    assert got.dtype == torch.long and got.shape == (len(want), seq_len)
    assert got.tolist() == want
    batches = list(iter_packed_batches(None, docs, seq_len, batch_size, add_bos, max_tokens,
                                       bos_id=1, eos_id=2))
    assert all(b.shape[0] <= batch_size for b in batches)
    cat = torch.cat(batches) if batches else torch.empty((0, seq_len), dtype=torch.long)
    assert torch.equal(cat, got)
    dropped = list(iter_packed_batches(None, docs, seq_len, batch_size, add_bos, max_tokens,
                                       drop_last=True, bos_id=1, eos_id=2))
    assert all(b.shape[0] == batch_size for b in dropped)
    assert len(dropped) == len(want) // batch_size


def test_pack_tokens_with_tokenizer_equals_pretokenized():
    tok = tiny_tokenizer()
    texts = ["The cat sat.", "", "A much longer second document, with punctuation!", "x"] * 40
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    a = pack_tokens(tok, texts, 16)
    b = pack_tokens(None, ids, 16, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)
    assert torch.equal(a, b)
    assert (a[:, 0] == tok.bos_token_id).all()
    # every stream token is used exactly once: row bodies concatenate to a prefix of the stream
    stream = [t for d in ids for t in d + [tok.eos_token_id]]
    flat = a[:, 1:].reshape(-1).tolist()
    assert flat == stream[: len(flat)] and len(stream) - len(flat) < 15
    assert torch.equal(pack_tokens(tok, iter(texts), 16), a)  # generators work
    assert pack_tokens(tok, texts, 16, max_tokens=40).shape == (2, 16)


def test_pack_tokens_errors():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="seq_len"):
        pack_tokens(tok, ["a"], 1)
    with pytest.raises(ValueError, match="seq_len"):
        pack_tokens(tok, ["a"], 0, add_bos=False)
    with pytest.raises(ValueError, match="max_tokens"):
        pack_tokens(tok, ["a"], 4, max_tokens=-1)
    with pytest.raises(ValueError, match="eos_id"):
        pack_tokens(None, [[5, 6]], 4, bos_id=1)
    with pytest.raises(ValueError, match="bos"):
        pack_tokens(None, [[5, 6]], 4, eos_id=2)
    with pytest.raises(TypeError, match="token-id"):
        pack_tokens(None, ["text"], 4, bos_id=1, eos_id=2)
    with pytest.raises(TypeError, match="strings"):
        pack_tokens(tok, [[1, 2]], 4)
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_packed_batches(tok, ["a"], 4, 0))
    assert pack_tokens(tok, [], 4).shape == (0, 4)


# --------------------------------------------------------------------------------------------
# parsers and filters
# --------------------------------------------------------------------------------------------

PO = r'''# Translator comment
msgid ""
msgstr ""
"Content-Type: text/plain; charset=UTF-8\n"
"Plural-Forms: nplurals=2; plural=(n != 1);\n"

#: file.py:1
msgid "Enter a valid value."
msgstr "Rhowch werth dilys."

#, fuzzy
msgid "This field is required."
msgstr "Mae angen y maes hwn."

msgid "Untranslated sentence here."
msgstr ""

msgctxt "month name"
msgid "May"
msgstr "Mai"

#, python-format
msgid "One apple"
msgid_plural "%(n)s apples"
msgstr[0] "Un afal"
msgstr[1] "%(n)s afal"

msgid ""
"A long message "
"split over lines with a \"quote\"\tand tab."
msgstr ""
"Neges hir "
"wedi'i rhannu \"dyfynnu\"\tа tab."

#~ msgid "Obsolete entry."
#~ msgstr "Cofnod darfodedig."
'''


def test_parse_po_entries():
    entries = C.parse_po(PO)
    by_id = {(e.msgctxt, e.msgid): e for e in entries}
    assert by_id[(None, "")].msgstr[0].startswith("Content-Type")
    assert by_id[(None, "Enter a valid value.")].msgstr == ["Rhowch werth dilys."]
    assert by_id[(None, "This field is required.")].fuzzy
    assert not by_id[(None, "This field is required.")].translated
    assert not by_id[(None, "Untranslated sentence here.")].translated
    assert by_id[("month name", "May")].msgstr == ["Mai"]
    plural = by_id[(None, "One apple")]
    assert plural.msgid_plural == "%(n)s apples" and plural.msgstr == ["Un afal", "%(n)s afal"]
    assert "python-format" in plural.flags
    long = by_id[(None, 'A long message split over lines with a "quote"\tand tab.')]
    assert long.msgstr == ["Neges hir wedi'i rhannu \"dyfynnu\"\tа tab."]
    assert by_id[(None, "Obsolete entry.")].obsolete


def test_po_segments_keeps_only_current_translations():
    segs = C.po_segments(C.parse_po(PO))
    assert segs == {
        "|Enter a valid value.": ("Rhowch werth dilys.", "Enter a valid value."),
        "month name|May": ("Mai", "May"),
        "|One apple": ("Un afal", "One apple"),
        '|A long message split over lines with a "quote"\tand tab.':
            ("Neges hir wedi'i rhannu \"dyfynnu\"\tа tab.",
             'A long message split over lines with a "quote"\tand tab.'),
    }


@pytest.mark.parametrize("bad", ['msgid "x"\nmsgstr "y"\nnonsense', 'msgid "unterminated\n',
                                 '"orphan continuation"\n', 'msgstr "no msgid"\n'])
def test_parse_po_rejects_malformed(bad):
    with pytest.raises(ValueError, match="line"):
        C.parse_po(bad)


FTL = '''# comment
-brand-short-name = Firefox
-brand-name =
    { $case ->
       *[nom] Mozilla Firefox
        [gen] Mozilla Firefoxes
    }
welcome = Welcome to { -brand-short-name }, the <a data-l10n-name="x">free</a> browser.
multi =
    First line of a message
    continues here.
    .title = Attribute text for { -brand-name(case: "gen") }
    .accesskey = F
tabs = { $count ->
        [one] One tab
       *[other] { $count } tabs
    }
choice = { PLATFORM() ->
        [windows] Options on Windows
       *[other] Preferences everywhere else
    }
literal = Braces { "{" } and { "}" } stay.
dangling = Broken { missing-ref } here.
attr-only =
    .label = Only an attribute here
'''


def test_parse_and_resolve_fluent():
    raw = C.parse_fluent(FTL)
    assert raw["multi"] == "First line of a message\ncontinues here."
    assert raw["multi.accesskey"] == "F"
    assert "attr-only" not in raw and "attr-only.label" in raw
    res = C.resolve_fluent(raw)
    assert res["welcome"] == 'Welcome to Firefox, the <a data-l10n-name="x">free</a> browser.'
    assert res["multi.title"] == "Attribute text for Mozilla Firefox"
    assert res["choice"] == "Preferences everywhere else"
    assert res["literal"] == "Braces { and } stay."
    assert res["attr-only.label"] == "Only an attribute here"
    assert "tabs" not in res  # default variant needs $count
    assert "dangling" not in res
    assert "-brand-short-name" not in res


def test_parse_properties():
    text = ("# comment\n! also comment\nsimple=Hello world\nspaced : Colon value\n"
            "cont = first \\\n    second\nuni=caf\\u00e9 \\n done\nkey\\=with=eq\n  \nempty=\n")
    p = C.parse_properties(text)
    assert p == {"simple": "Hello world", "spaced": "Colon value", "cont": "first second",
                 "uni": "café \n done", "key=with": "eq", "empty": ""}


MALLARD_EN = b'''<page xmlns="http://projectmallard.org/1.0/"
      xmlns:its="http://www.w3.org/2005/11/its" id="x">
  <info><desc>Short description of the page.</desc>
    <credit type="author"><name>Someone</name></credit></info>
  <title>Add an account</title>
  <p>Open the <gui>Activities</gui> overview and
     start typing.</p>
  <comment><cite>Editor</cite><p>Editorial note.</p></comment>
  <code>ls -l</code>
  <p its:translate="no">Do not translate.</p>
  <steps><item><p>Click &amp; wait.</p></item></steps>
</page>'''


def test_mallard_units():
    assert C.mallard_units(MALLARD_EN) == [
        "Short description of the page.", "Add an account",
        "Open the Activities overview and start typing.", "Click & wait."]


def test_text_helpers():
    assert C.strip_markup('A <b>bold</b>&nbsp;move &amp; <a href="x">link</a>\n  end') == \
        "A bold move & link end"
    for s in ["Hello %s there", "%(name)s was here", "Open %1$S now", "#1 tabs open", "Hi {name}"]:
        assert C.has_placeholder(s), s
    assert not C.has_placeholder("A plain 100% sentence with words.")
    assert C.looks_like_prose("This is a real sentence of text.", 20)
    assert not C.looks_like_prose("Short label", 20)
    assert not C.looks_like_prose("/etc/dconf/db/local.d/01-background", 20)
    assert not C.looks_like_prose("Supercalifragilisticexpialidocious!", 20)
    assert C.looks_like_prose("这是一个很长的中文句子，没有空格但是它是一个真正的句子。", 20)
    assert C.canonical_lang("ga-IE") == "ga_IE"
    assert C.canonical_lang("sr@latin") == "sr_Latn"
    assert C.canonical_lang("PT_br") == "pt_BR"
    with pytest.raises(ValueError, match="language code"):
        C.canonical_lang("not a code")


def test_filter_segments():
    segs = {
        "a": ("Mae hwn yn frawddeg Gymraeg dda iawn.", "This is a very good Welsh sentence."),
        "b": ("This sentence was left untranslated.", "This sentence was left untranslated."),
        "c": ("Also <b>left</b> in English, unaligned!", None),
        "d": ("Byr iawn.", "Very short."),
        "e": ("Agor %S mewn ffenest newydd nawr os gwelwch yn dda", "Open %S in a new window"),
    }
    eng = {"Also left in English, unaligned!"}
    got = C.filter_segments(segs, lang="cy", english_texts=eng, min_chars=20)
    assert got == {"a": "Mae hwn yn frawddeg Gymraeg dda iawn."}
    got_en = C.filter_segments(segs, lang="en", english_texts=eng, min_chars=20)
    assert set(got_en) == {"a", "b", "c"}


def test_split_is_a_stable_hash_of_the_id():
    ids = [f"firefox:file.ftl:msg-{i}" for i in range(4000)]
    splits = [C.split_of(i, 0.1) for i in ids]
    assert splits == [C.split_of(i, 0.1) for i in ids]
    frac = splits.count("validation") / len(ids)
    assert 0.08 < frac < 0.12
    assert splits != [C.split_of(i, 0.1, seed=1) for i in ids]
    assert all(C.split_of(i, 0.0) == "train" for i in ids[:50])
    # dedup keeps the first id in sorted order; row order does not matter
    rows = [("s", "b", "same text"), ("s", "a", "same text"), ("s", "c", "other text")]
    a = C._dedup_and_split(rows, 0.5, 0)
    b = C._dedup_and_split(list(reversed(rows)), 0.5, 0)
    assert a == b
    kept = sorted(r["id"] for v in a.values() for r in v)
    assert kept == ["s:a", "s:c"]


# --------------------------------------------------------------------------------------------
# the whole corpus pipeline on synthetic packages
# --------------------------------------------------------------------------------------------


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _make_deb(path: Path, package: str, version: str, files: dict[str, bytes]) -> None:
    control = f"Package: {package}\nVersion: {version}\nArchitecture: all\n".encode()
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", _tar_xz({"control": control})),
               ("data.tar.xz", _tar_xz(files))]
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(bytes(out))


def _xpi(locale: str, ftl: str, props: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("manifest.json", json.dumps({"languages": {locale: {"version": "1"}}}))
        z.writestr(f"browser/localization/{locale}/browser/test.ftl", ftl)
        z.writestr(f"chrome/{locale}/locale/{locale}/global/test.properties", props)
    return buf.getvalue()


def _page(lang: str | None, title: str, paras: list[str]) -> bytes:
    ps = "".join(f"<p>{p}</p>" for p in paras)
    attr = f' xml:lang="{lang}"' if lang else ""
    return (f'<page xmlns="http://projectmallard.org/1.0/" id="p"{attr}><title>{title}</title>'
            f'{ps}</page>').encode()


FTL_EN = """-brand-short-name = Firefox
intro = { -brand-short-name } keeps your browsing history private on this computer.
same = This string stays in English for every locale here.
label = Settings
count = { $n } sites are blocked by the browser right now.
"""
FTL_CY = """-brand-short-name = Firefox
intro = Mae { -brand-short-name } yn cadw eich hanes pori yn breifat ar y cyfrifiadur hwn.
same = This string stays in English for every locale here.
label = Gosodiadau
count = Mae { $n } gwefan wedi eu rhwystro gan y porwr ar hyn o bryd.
"""
FTL_GL = """-brand-short-name = Firefox
intro = { -brand-short-name } mantén o seu historial de navegación privado neste computador.
"""
PROPS_EN = "warn=The page you are trying to view cannot be shown right now.\n"
PROPS_CY = "warn=Nid oes modd dangos y dudalen rydych yn ceisio ei gweld ar hyn o bryd.\n"
PO_CY = '''msgid ""
msgstr "Content-Type: text/plain; charset=UTF-8\\n"

msgid "Enter a valid email address, please."
msgstr "Rhowch gyfeiriad e-bost dilys, os gwelwch yn dda."

#, fuzzy
msgid "This fuzzy entry must not be used at all."
msgstr "Ni ddylid defnyddio'r cofnod niwlog hwn o gwbl."
'''
PO_EN = '''msgid ""
msgstr ""

msgid "Enter a valid email address, please."
msgstr ""

msgid "This fuzzy entry must not be used at all."
msgstr ""
'''


@pytest.fixture()
def fake_cache(tmp_path, monkeypatch):
    """A corpus cache whose downloads/ already holds synthetic packages; any attempt to reach
    apt or pip fails the test."""
    dl = tmp_path / "corpus" / "downloads"
    dl.mkdir(parents=True)
    help_root = "usr/share/help"
    en_paras = ["Open the Activities overview and start typing.",
                "Your files are kept on the computer until you delete them.",
                "Your files are kept on the computer until you delete them.",
                "This paragraph is never translated by anyone at all."]
    gl_paras = ["Abra a vista de <gui>Actividades</gui> e comece a escribir.",
                "Os seus ficheiros gárdanse no computador ata que os elimine.",
                "Os seus ficheiros gárdanse no computador ata que os elimine.",
                "This paragraph is never translated by anyone at all."]
    _make_deb(dl / "gnome-user-docs_43.0-2_all.deb", "gnome-user-docs", "43.0-2", {
        f"{help_root}/C/gnome-help/a.page": _page(None, "Getting started with the desktop", en_paras),
        f"{help_root}/gl/gnome-help/a.page": _page("gl", "Primeiros pasos co escritorio", gl_paras),
        f"{help_root}/C/gnome-help/figures/x.png": b"\x89PNG",
        # structure differs from the English page: kept as text, aligned with nothing, and
        # its English leftovers caught by the all-English filter
        f"{help_root}/C/gnome-help/b.page": _page(None, "Printing a document on paper",
                                                  ["Choose Print from the application menu."]),
        f"{help_root}/gl/gnome-help/b.page": _page("gl", "Imprimir un documento en papel", [
            "Escolla Imprimir no menú do aplicativo.", "Open the Activities overview and start typing."]),
    })
    for loc, ftl, props in [("en-GB", FTL_EN, PROPS_EN), ("cy", FTL_CY, PROPS_CY),
                            ("gl", FTL_GL, "")]:
        pkg = f"firefox-esr-l10n-{loc.lower()}"
        _make_deb(dl / f"{pkg}_153.0esr-1_all.deb", pkg, "153.0esr-1", {
            f"usr/lib/firefox-esr/browser/extensions/langpack-{loc}@firefox-esr.mozilla.org.xpi":
                _xpi(loc, ftl, props)})
    with zipfile.ZipFile(dl / f"django-{C.DJANGO_VERSION}-py3-none-any.whl", "w") as z:
        z.writestr("django/conf/locale/cy/LC_MESSAGES/django.po", PO_CY)
        z.writestr("django/conf/locale/en/LC_MESSAGES/django.po", PO_EN)

    def no_network(*a, **k):
        raise AssertionError(f"test tried to run {a!r}")

    monkeypatch.setattr(C.subprocess, "run", no_network)
    monkeypatch.setattr(M.subprocess, "run", no_network)
    return tmp_path / "corpus"


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
            assert all(C.split_of(i, 0.3) == split for i in ds["id"])
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
        ("django", C.DJANGO_VERSION, "BSD-3-Clause")}
    assert sum(cy["rows"].values()) == 3
    assert man["params"] == {"min_chars": 20, "val_fraction": 0.3, "seed": 0}

    # second call is served from the cache: identical content
    again = build_corpus(["cy"], cache_dir=fake_cache, min_chars=20, val_fraction=0.3)
    assert again["cy"]["train"]["id"] == corpus["cy"]["train"]["id"]


def test_build_corpus_is_deterministic_across_caches(fake_cache, tmp_path):
    other = tmp_path / "copy"
    import shutil
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


def test_apt_download_errors(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package foo")

    monkeypatch.setattr(C.shutil, "which", lambda name: "/usr/bin/apt-get")
    monkeypatch.setattr(C.subprocess, "run", fake_run)
    monkeypatch.setattr(C, "_is_root", lambda: False)
    with pytest.raises(C.CorpusSourceError, match="apt-get update"):
        C.apt_download("foo", tmp_path)
    monkeypatch.setattr(C, "_is_root", lambda: True)
    with pytest.raises(LookupError, match="does not exist"):
        C.apt_download("foo", tmp_path)
    assert ["apt-get", "update"] in calls
    monkeypatch.setattr(C.shutil, "which", lambda name: None)
    with pytest.raises(C.CorpusSourceError, match="apt-get not found"):
        C.apt_download("foo", tmp_path)


def test_deb_reader_rejects_non_deb(tmp_path):
    p = tmp_path / "x.deb"
    p.write_bytes(b"not an archive")
    with pytest.raises(C.CorpusSourceError, match="not a Debian package"):
        C.deb_version(p)


# --------------------------------------------------------------------------------------------
# load_text_dataset
# --------------------------------------------------------------------------------------------


def test_load_text_dataset_inputs(tmp_path):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_dict({"text": [f"line {i}" for i in range(50)]})
    saved = tmp_path / "saved"
    DatasetDict({"train": ds}).save_to_disk(str(saved))
    assert load_text_dataset(saved)["train"]["text"] == ds["text"]
    assert load_text_dataset(ds)["train"]["text"] == ds["text"]

    txt = tmp_path / "a.txt"
    txt.write_text("first line\nsecond line\n")
    assert load_text_dataset(txt)["train"]["text"] == ["first line", "second line"]
    val = tmp_path / "b.txt"
    val.write_text("held out\n")
    dd = load_text_dataset({"train": str(txt), "validation": str(val)})
    assert dd["validation"]["text"] == ["held out"]

    jl = tmp_path / "d" / "train.jsonl"
    jl.parent.mkdir()
    jl.write_text("\n".join(json.dumps({"content": f"doc {i}", "x": i}) for i in range(30)))
    dd = load_text_dataset(jl.parent, text_column="content", val_fraction=0.3)
    assert "text" in dd["train"].column_names and "content" not in dd["train"].column_names
    assert sorted(list(dd["train"]["text"]) + list(dd["validation"]["text"])) == sorted(f"doc {i}" for i in range(30))
    assert all(C.split_of(t, 0.3) == "validation" for t in dd["validation"]["text"])


def test_load_text_dataset_errors(tmp_path):
    from datasets import Dataset

    with pytest.raises(ValueError, match="no column 'text'"):
        load_text_dataset(Dataset.from_dict({"body": ["a"]}))
    with pytest.raises(TypeError, match="spec must be"):
        load_text_dataset(42)
    bad = tmp_path / "x.docx"
    bad.write_text("?")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_text_dataset([str(bad)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a saved dataset"):
        load_text_dataset(tmp_path / "empty")
    with pytest.raises(ValueError, match="val_fraction"):
        load_text_dataset(Dataset.from_dict({"text": ["a"]}), val_fraction=1.5)


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
    assert C.corpus_dir() == tmp_path / "corpus"
    assert M.model_cache_dir("Gemma-3-270M") == tmp_path / "models" / "gemma3-270m"


# --------------------------------------------------------------------------------------------
# slow: real packages and models
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
