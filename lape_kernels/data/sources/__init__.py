"""The text sources of the offline corpus, one class per source, picked by name from a registry.

All three are translations of one English original, so every segment has an id that aligns
it with English:

* ``gnome-help``: Debian ``gnome-user-docs`` (GNOME desktop help, CC-BY-SA-3.0), Mallard pages.
* ``firefox``: Debian ``firefox-esr-l10n-<locale>`` (Firefox language packs, MPL-2.0), Fluent
  and .properties messages; English reference = the en-GB pack.
* ``django``: PyPI ``django`` wheel (BSD-3-Clause), gettext .po catalogs; English = msgid.

A new source is a ``TextSource`` subclass added to ``SOURCES``; nothing else names sources.
"""

from __future__ import annotations

from typing import Sequence

from .base import Segments, SourcePackage, TextSource, canonical_lang
from .django import DJANGO_VERSION, DjangoSource
from .firefox import FirefoxSource
from .gnome_help import GnomeHelpSource

__all__ = [
    "DEFAULT_SOURCES",
    "DJANGO_VERSION",
    "SOURCES",
    "DjangoSource",
    "FirefoxSource",
    "GnomeHelpSource",
    "Segments",
    "SourcePackage",
    "TextSource",
    "canonical_lang",
    "check_sources",
    "get_source",
]

#: name -> the source; the order is the default order of a build
SOURCES: dict[str, TextSource] = {
    source.name: source for source in (GnomeHelpSource(), FirefoxSource(), DjangoSource())
}
DEFAULT_SOURCES = tuple(SOURCES)


def get_source(name: str) -> TextSource:
    """The registered source called `name`."""
    try:
        return SOURCES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown text source {name!r}; the sources are "
                         f"{', '.join(map(repr, SOURCES))}") from None


def check_sources(sources: str | Sequence[str] | None) -> tuple[TextSource, ...]:
    """The sources named in `sources` (a name or a non-empty list of names; None = all)."""
    if sources is None:
        sources = DEFAULT_SOURCES
    if isinstance(sources, str):
        sources = (sources,)
    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources:
        raise ValueError(f"sources must be a non-empty subset of {sorted(SOURCES)}, got {sources!r}")
    return tuple(SOURCES[s] for s in sources)
