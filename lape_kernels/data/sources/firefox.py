"""Firefox language packs: Debian ``firefox-esr-l10n-<locale>`` (MPL-2.0), Fluent (.ftl) and
.properties messages, full UI sentences in ~100 locales (incl. cy, eu, ga, is, ka, mk, ne, af).
Segment id = ``file:message-id``; the English reference is the en-GB pack."""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

from ..debian import apt_download, deb_tar
from ..errors import CorpusSourceError
from ..formats import parse_fluent, parse_properties, resolve_fluent
from .base import Segments, SourcePackage, TextSource, canonical_lang

__all__ = ["FirefoxSource"]

# Firefox ESR language packs in Debian 12 (apt-cache search firefox-esr-l10n).
_FIREFOX_LOCALES = (
    "ach af an ar ast az be bg bn br bs ca ca-valencia cak cs cy da de dsb el en-ca en-gb eo "
    "es-ar es-cl es-es es-mx et eu fa ff fi fr fur fy-nl ga-ie gd gl gn gu-in he hi-in hr hsb hu "
    "hy-am ia id is it ja ka kab kk km kn ko lij lt lv mk mr ms my nb-no ne-np nl nn-no oc pa-in "
    "pl pt-br pt-pt rm ro ru sat sc sco si sk skr sl son sq sr sv-se szl ta te tg th tl tr trs uk "
    "ur uz vi xh zh-cn zh-tw"
).split()
# locale whose region is the language's main variant -> plain language code
_FIREFOX_PLAIN = {
    "en-gb": "en", "ga-ie": "ga", "ne-np": "ne", "sv-se": "sv", "gu-in": "gu", "hi-in": "hi",
    "pa-in": "pa", "hy-am": "hy", "es-es": "es", "nb-no": "nb", "nn-no": "nn", "fy-nl": "fy",
    "pt-pt": "pt",
}
_ENGLISH_PACK = "firefox-esr-l10n-en-gb"
# Fluent attributes that hold CSS, shortcut keys or sizes rather than words
_FIREFOX_NON_TEXT_ATTRS = frozenset({"style", "accesskey", "key", "commandkey", "keycode",
                                     "width", "height", "modifiers"})


def _firefox_lang(locale: str) -> str:
    return _FIREFOX_PLAIN.get(locale) or canonical_lang(locale)


def _read_pack(deb: Path) -> dict[str, str]:
    """uid -> text of one language pack (Fluent messages resolved, .properties values)."""
    xpi = None
    with deb_tar(deb, "data") as tf:
        for m in tf:
            if m.isfile() and m.name.endswith(".xpi"):
                xpi = tf.extractfile(m).read()
                break
    if xpi is None:
        raise CorpusSourceError(f"{deb.name}: no .xpi language pack inside")
    out: dict[str, str] = {}
    with zipfile.ZipFile(io.BytesIO(xpi)) as z:
        manifest = json.loads(z.read("manifest.json"))
        locale = next(iter(manifest.get("languages", {})), None)
        for name in sorted(z.namelist()):
            parts = name.split("/")
            rel = "/".join("{loc}" if p == locale else p for p in parts)
            if name.endswith(".ftl"):
                messages = resolve_fluent(parse_fluent(z.read(name).decode("utf-8", "replace")))
            elif name.endswith(".properties"):
                messages = parse_properties(z.read(name).decode("utf-8", "replace"))
            else:
                continue
            for key, text in messages.items():
                if key.rpartition(".")[2].lower() in _FIREFOX_NON_TEXT_ATTRS:
                    continue
                out[f"{rel}:{key}"] = text
    return out


class FirefoxSource(TextSource):
    """One package per locale; a message id aligns a translation with the en-GB message."""

    name = "firefox"
    origin = "debian"
    package = "firefox-esr-l10n-<locale>"
    license = "MPL-2.0"
    homepage = "https://hg.mozilla.org/l10n-central"
    languages = tuple(sorted({_firefox_lang(loc) for loc in _FIREFOX_LOCALES}))

    @staticmethod
    def package_for(lang: str) -> str:
        """The Debian package of the language pack for `lang` (a code in ``languages``)."""
        for loc in _FIREFOX_LOCALES:
            if _firefox_lang(loc) == lang:
                return f"firefox-esr-l10n-{loc}"
        raise KeyError(lang)

    def fetch(self, langs: Sequence[str], downloads: Path) -> dict[str, SourcePackage]:
        english = SourcePackage.from_deb(apt_download(_ENGLISH_PACK, downloads))
        out = {}
        for lang in langs:
            try:
                deb = apt_download(self.package_for(lang), downloads)
            except LookupError as e:  # a language pack dropped from the archive: skip it
                warnings.warn(f"firefox source: {e}; language {lang!r} skipped")
                continue
            out[lang] = SourcePackage.from_deb(deb, english=english)
        return out

    def read(self, packages: Mapping[str, SourcePackage], langs: Sequence[str]) -> dict[str, Segments]:
        english = _read_pack(packages[langs[0]].english.path)
        out = {}
        for lang in langs:
            texts = english if lang == "en" else _read_pack(packages[lang].path)
            out[lang] = {uid: (t, english.get(uid)) for uid, t in texts.items()}
        return out

    def segments_file(self, lang: str, package: SourcePackage) -> Path:
        """Also keyed by the English pack's version: the English side of a segment comes
        from it."""
        return super().segments_file(lang, package).with_name(
            f"{lang}.en-gb_{package.english.version}.json")
