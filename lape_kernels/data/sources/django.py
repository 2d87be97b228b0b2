"""Django's translations: the PyPI ``django`` wheel (BSD-3-Clause), gettext .po catalogs in ~100
languages, short UI sentences. Segment id = ``catalog|msgctxt|msgid``; English = the msgid."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Mapping, Sequence

from ..formats import parse_po, po_segments
from ..models import fetch_wheel
from .base import Segments, SourcePackage, TextSource, canonical_lang

__all__ = ["DJANGO_VERSION", "DjangoSource"]

DJANGO_VERSION = "5.2.19"  # newest Django whose wheel installs on Python 3.10/3.11

_DJANGO_LANGS = (
    "af ar ar_DZ ast az be bg bn br bs ca ckb cs cy da de de_CH dsb el eo es es_AR es_CO es_MX "
    "es_NI es_PR es_VE et eu fa fi fr fr_BE fr_CA fr_CH fy ga gd gl he hi hr hsb hu hy ia id ig "
    "io is it ja ka kab kk km kn ko ky lb lt lv mk ml mn mr ms my nb ne nl nn os pa pl pt pt_BR "
    "ro ru sk sl sq sr sr_Latn sv sw ta te tg th tk tr tt udm ug uk ur uz vi zh_CN zh_TW"
).split()
# language code -> Django's locale directory, where they differ
_DJANGO_DIRS = {"zh_CN": "zh_Hans", "zh_TW": "zh_Hant"}


class DjangoSource(TextSource):
    """One wheel holds every catalog; English segments are the msgids of the 'en' catalogs."""

    name = "django"
    origin = "pypi"
    package = f"django=={DJANGO_VERSION}"
    license = "BSD-3-Clause"
    homepage = "https://www.djangoproject.com/"
    languages = tuple(["en"] + [canonical_lang(d) for d in _DJANGO_LANGS])

    def fetch(self, langs: Sequence[str], downloads: Path) -> dict[str, SourcePackage]:
        package = SourcePackage(fetch_wheel(self.package, downloads), "django", DJANGO_VERSION)
        return {lang: package for lang in langs}

    def read(self, packages: Mapping[str, SourcePackage], langs: Sequence[str]) -> dict[str, Segments]:
        out: dict[str, Segments] = {lang: {} for lang in langs}
        dirs = {_DJANGO_DIRS.get(lang, lang): lang for lang in langs}
        with zipfile.ZipFile(packages[langs[0]].path) as z:
            for name in sorted(z.namelist()):
                parts = name.split("/")
                if not name.endswith(".po") or "locale" not in parts:
                    continue
                i = parts.index("locale")
                if i + 1 >= len(parts):
                    continue
                code = parts[i + 1]
                catalog = "/".join(parts[:i + 1] + ["{loc}"] + parts[i + 2:])
                if "en" in langs and code == "en":
                    for e in parse_po(z.read(name).decode("utf-8", "replace")):
                        if e.msgid and not e.obsolete:
                            uid = f"{catalog}|{e.msgctxt or ''}|{e.msgid}"
                            out["en"][uid] = (e.msgid, e.msgid)
                    continue
                lang = dirs.get(code)
                if lang is None or lang == "en":
                    continue
                for uid, (text, eng) in po_segments(parse_po(z.read(name).decode("utf-8", "replace"))).items():
                    out[lang][f"{catalog}|{uid}"] = (text, eng)
        return out
