"""GNOME desktop help: Debian ``gnome-user-docs`` (CC-BY-SA-3.0), Mallard pages of prose in ~40
languages. Segment id = ``guide/page#n``, the n-th translatable block of the page."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Mapping, Sequence

from ..debian import apt_download, deb_tar
from ..formats import mallard_units
from .base import Segments, SourcePackage, TextSource, canonical_lang

__all__ = ["GnomeHelpSource"]

# help directories of gnome-user-docs 43 (usr/share/help/<dir>/); "C" is the English original
_GNOME_LANGS = (
    "as ca cs da de el es fa fi fr gl gu he hi hr hu id it ja kn ko lt lv mr nl pa pl pt pt_BR "
    "ro ru sl sr sr_Latn sv ta te tr uk vi zh_CN"
).split()
_UNALIGNED = re.compile(r"#u\d+$")


class GnomeHelpSource(TextSource):
    """One package holds every language; a translated page aligns with the English page block
    by block when both have the same number of blocks."""

    name = "gnome-help"
    origin = "debian"
    package = "gnome-user-docs"
    license = "CC-BY-SA-3.0"
    homepage = "https://gitlab.gnome.org/GNOME/gnome-user-docs"
    languages = tuple(["en"] + [canonical_lang(d) for d in _GNOME_LANGS])

    def fetch(self, langs: Sequence[str], downloads: Path) -> dict[str, SourcePackage]:
        package = SourcePackage.from_deb(apt_download(self.package, downloads))
        return {lang: package for lang in langs}

    def read(self, packages: Mapping[str, SourcePackage], langs: Sequence[str]) -> dict[str, Segments]:
        """English = the C page's block at the same index; a page whose structure differs from
        the English keeps its text under ``page#u<n>`` ids that align with nothing."""
        want = {"C": "en"}
        for lang in langs:
            for d in _GNOME_LANGS:
                if canonical_lang(d) == lang:
                    want[d.replace("sr_Latn", "sr@latin")] = lang
        pages: dict[str, dict[str, list[str]]] = {d: {} for d in want}
        with deb_tar(packages[langs[0]].path, "data") as tf:
            for m in tf:
                parts = m.name.lstrip("./").split("/")
                if (len(parts) == 6 and parts[:3] == ["usr", "share", "help"] and parts[3] in want
                        and parts[5].endswith(".page") and m.isfile()):
                    try:
                        units = mallard_units(tf.extractfile(m).read())
                    except ET.ParseError:
                        continue
                    pages[parts[3]][f"{parts[4]}/{parts[5]}"] = units
        english = pages["C"]
        out: dict[str, Segments] = {}
        for d, lang in want.items():
            segs = out.setdefault(lang, {})
            for page, units in sorted(pages[d].items()):
                ref = english.get(page)
                aligned = ref is not None and len(ref) == len(units)
                for i, text in enumerate(units):
                    if aligned:
                        segs[f"{page}#{i}"] = (text, ref[i])
                    else:  # structure differs: keep text, but it aligns with nothing
                        segs[f"{page}#u{i}"] = (text, None)
        return out

    def aligned(self, uid: str) -> bool:
        return not _UNALIGNED.search(uid)
