"""Text filters of the corpus: one canonical spelling of a segment, markup removal, and the
tests that tell a natural sentence from a label, a path or a format string.

Why here, apart from the parsers and the corpus: the formats flatten markup with the same
normalisation the corpus filters compare against, so both must use the one definition.
"""

from __future__ import annotations

import html
import re
import unicodedata

__all__ = ["has_placeholder", "looks_like_prose", "normalize_text", "strip_markup"]

_TAG = re.compile(r"<[^<>]*>")
_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """NFC + collapse whitespace: one canonical spelling of a segment (dedup, comparisons)."""
    return _WS.sub(" ", unicodedata.normalize("NFC", text)).strip()


def strip_markup(text: str) -> str:
    """Remove XML/HTML tags (keeping their text), unescape entities, normalise whitespace."""
    text = _TAG.sub("", text)
    text = html.unescape(text)
    return normalize_text(text.replace("\u00a0", " "))


_PLACEHOLDER = re.compile(
    r"%(\([^)]*\))?[-#0+]*\d*(\.\d+)?[sdifSDuxXr@]"  # printf / python %-format
    r"|%\d+\$[sdSD@]"                                 # positional %1$S
    r"|#\d\b"                                         # Mozilla plural placeholders
    r"|\{\{?\s*\$?\w*\s*\}?\}"                        # {name}, {{ name }}, {$x}
)


def has_placeholder(text: str) -> bool:
    """True when the string still has a format placeholder: not a natural sentence."""
    return bool(_PLACEHOLDER.search(text))


def _letter_like(ch: str) -> bool:
    cat = unicodedata.category(ch)
    return cat[0] in "LM"


def _is_spaceless_script(text: str) -> bool:
    """Mostly CJK, Thai, Lao, Myanmar, Khmer or Hangul: scripts whose sentences may have no
    spaces, so a word count says nothing about them."""
    n = sum(1 for ch in text if "\u3040" <= ch <= "\u9fff" or "\u0e00" <= ch <= "\u0eff"
            or "\u1000" <= ch <= "\u109f" or "\u1780" <= ch <= "\u17ff" or "\uac00" <= ch <= "\ud7af")
    return n * 2 >= len(text)


def looks_like_prose(text: str, min_chars: int) -> bool:
    """Long enough, mostly letters, and several words: sentences, not labels, paths or code."""
    if len(text) < min_chars:
        return False
    chars = [ch for ch in text if not ch.isspace()]
    if not chars or sum(map(_letter_like, chars)) < 0.6 * len(chars):
        return False
    if len(text.split()) < 3 and not _is_spaceless_script(text):
        return False
    return True
