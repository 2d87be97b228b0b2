"""Mallard pages (GNOME help): the translatable blocks of a page, in document order."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from ..text import normalize_text

__all__ = ["mallard_units"]

_MALLARD_NS = "http://projectmallard.org/1.0/"
_ITS_NS = "http://www.w3.org/2005/11/its"
_MALLARD_UNITS = frozenset({"p", "title", "desc", "subtitle", "cite"})
_MALLARD_SKIP = frozenset({"comment", "code", "screen", "credit", "media"})


def mallard_units(xml: bytes | str) -> list[str]:
    """Text of the translatable blocks of a Mallard page, in document order.

    Editorial <comment>s (dropped by translations), code and credits are skipped, so a
    translated page yields the same number of units as its English original and the n-th
    units are translations of each other. Inline markup is flattened to its text.
    """
    root = ET.fromstring(xml)
    out: list[str] = []

    def walk(el):
        tag = el.tag
        if not isinstance(tag, str):
            return
        ns, _, local = tag[1:].partition("}") if tag.startswith("{") else ("", "", tag)
        if el.get(f"{{{_ITS_NS}}}translate") == "no":
            return
        if ns == _MALLARD_NS and local in _MALLARD_SKIP:
            return
        if ns == _MALLARD_NS and local in _MALLARD_UNITS:
            out.append(normalize_text("".join(el.itertext()).replace("\u00a0", " ")))
            return
        for child in el:
            walk(child)

    walk(root)
    return out
