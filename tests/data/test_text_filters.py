"""Text filters: markup, placeholders, what counts as prose; language-code spelling."""

from __future__ import annotations

import pytest

from lape_kernels.data.sources import canonical_lang
from lape_kernels.data.text import has_placeholder, looks_like_prose, normalize_text, strip_markup


def test_text_helpers():
    assert strip_markup('A <b>bold</b>&nbsp;move &amp; <a href="x">link</a>\n  end') == \
        "A bold move & link end"
    for s in ["Hello %s there", "%(name)s was here", "Open %1$S now", "#1 tabs open", "Hi {name}"]:
        assert has_placeholder(s), s
    assert not has_placeholder("A plain 100% sentence with words.")
    assert looks_like_prose("This is a real sentence of text.", 20)
    assert not looks_like_prose("Short label", 20)
    assert not looks_like_prose("/etc/dconf/db/local.d/01-background", 20)
    assert not looks_like_prose("Supercalifragilisticexpialidocious!", 20)
    assert looks_like_prose("这是一个很长的中文句子，没有空格但是它是一个真正的句子。", 20)
    assert canonical_lang("ga-IE") == "ga_IE"
    assert canonical_lang("sr@latin") == "sr_Latn"
    assert canonical_lang("PT_br") == "pt_BR"
    with pytest.raises(ValueError, match="language code"):
        canonical_lang("not a code")


def test_normalize_text_is_one_spelling():
    # decomposed and composed é, runs of blanks and newlines: one spelling
    assert normalize_text("  Caf\u0065\u0301 \n\t au  lait ") == normalize_text("Caf\u00e9 au lait")
    assert normalize_text("  Caf\u0065\u0301 \n\t au  lait ") == "Caf\u00e9 au lait"
