"""What every text source of the corpus provides, and the language-code spelling they share.

A source is a set of translations of one English original, shipped in packages: it knows which
languages it has, how to fetch the package(s) holding them, and how to read segments out of
them. Each segment has an id shared by its translations, so segments align across languages.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Mapping, Sequence

from ..debian import deb_package_name, deb_version

__all__ = ["Segments", "SourcePackage", "TextSource", "canonical_lang"]

#: uid -> (text, the English text it translates, or None when it aligns with nothing)
Segments = dict[str, tuple[str, str | None]]


def canonical_lang(code: str) -> str:
    """'ga-IE' -> 'ga_IE', 'sr@latin' -> 'sr_Latn', 'pt-br' -> 'pt_BR': one spelling per variant."""
    code = code.strip().replace("@latin", "_Latn").replace("-", "_")
    if not code or not re.fullmatch(r"[A-Za-z]{2,3}(_[A-Za-z0-9]+)*", code):
        raise ValueError(f"language code {code!r} is not a language code like 'cy' or 'pt_BR'")
    parts = code.split("_")
    out = [parts[0].lower()]
    for p in parts[1:]:
        if len(p) == 2 and p.isalpha():
            out.append(p.upper())
        elif len(p) == 4 and p.isalpha():
            out.append(p.title())
        else:
            out.append(p.lower())
    return "_".join(out)


@dataclass(frozen=True)
class SourcePackage:
    """A fetched package file, named and versioned as the corpus records it.

    `english`: the package holding the English original when that is another package (Firefox
    translates into one pack per language; its English reference is the en-GB pack)."""

    path: Path
    name: str
    version: str
    english: SourcePackage | None = None

    @classmethod
    def from_deb(cls, deb: Path, english: SourcePackage | None = None) -> SourcePackage:
        return cls(deb, deb_package_name(deb), deb_version(deb), english)


class TextSource(ABC):
    """One source of translated text; the registry in ``lape_kernels.data.sources`` holds one
    instance of each. Stateless: everything a build needs travels in the arguments."""

    name: ClassVar[str]
    origin: ClassVar[str]  # the registry the packages come from: "debian" or "pypi"
    package: ClassVar[str]  # the package(s), as the manifest describes them
    license: ClassVar[str]
    homepage: ClassVar[str]
    languages: ClassVar[tuple[str, ...]]  # canonical codes (see canonical_lang), English included

    @abstractmethod
    def fetch(self, langs: Sequence[str], downloads: Path) -> dict[str, SourcePackage]:
        """lang -> the package holding it, downloaded into `downloads` unless already there.
        A language whose package no longer exists is left out with a warning."""

    @abstractmethod
    def read(self, packages: Mapping[str, SourcePackage], langs: Sequence[str]) -> dict[str, Segments]:
        """lang -> its segments, for `langs` (each a key of `packages`, as fetch returned)."""

    def aligned(self, uid: str) -> bool:
        """Whether segment `uid` shares its id with its translations (parallel sentences use
        only those)."""
        return True

    def segments_file(self, lang: str, package: SourcePackage) -> Path:
        """Where (relative to this source's segment cache) the segments of `lang` read from
        `package` are kept: a new package version is read afresh."""
        return Path(f"{package.name}_{package.version}") / f"{lang}.json"

    def provenance(self, package: SourcePackage) -> dict:
        """What the manifest and the dataset info record about text read from `package`."""
        prov = {"source": self.name, "package": package.name, "version": package.version,
                "origin": self.origin, "license": self.license, "homepage": self.homepage,
                "file": package.path.name}
        if package.english is not None:
            prov["english_reference"] = {"package": package.english.name,
                                         "version": package.english.version}
        return prov

    def __repr__(self) -> str:
        return f"<text source {self.name!r}>"
