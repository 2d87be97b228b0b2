"""gettext .po catalogs (Django's translations): entries with contexts, plurals, flags and
obsolete entries, and the (translation, English) pairs a corpus takes from them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

__all__ = ["PoEntry", "parse_po", "po_segments"]


@dataclass
class PoEntry:
    """One catalog entry. msgstr holds msgstr (1 item) or msgstr[0..n] for plural entries."""

    msgid: str
    msgstr: list[str] = field(default_factory=list)
    msgctxt: str | None = None
    msgid_plural: str | None = None
    flags: set[str] = field(default_factory=set)
    obsolete: bool = False

    @property
    def fuzzy(self) -> bool:
        return "fuzzy" in self.flags

    @property
    def translated(self) -> bool:
        return bool(self.msgstr) and all(s != "" for s in self.msgstr) and not self.fuzzy


_PO_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "a": "\a", "b": "\b",
               "f": "\f", "v": "\v", "'": "'", "?": "?"}


def _po_unquote(s: str, lineno: int) -> str:
    """The value of one C-style quoted string (escapes and octal codes resolved)."""
    s = s.strip()
    if len(s) < 2 or s[0] != '"' or s[-1] != '"':
        raise ValueError(f"line {lineno}: expected a quoted string, got {s!r}")
    body, out, i = s[1:-1], [], 0
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt in _PO_ESCAPES:
                out.append(_PO_ESCAPES[nxt])
                i += 2
                continue
            m = re.match(r"[0-7]{1,3}", body[i + 1:])
            if m:
                out.append(chr(int(m.group(0), 8)))
                i += 1 + len(m.group(0))
                continue
            out.append(nxt)
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


_PO_KEY = re.compile(r"^(msgctxt|msgid_plural|msgid|msgstr(?:\[(\d+)\])?)\s+(\".*\")\s*$")


def parse_po(text: str) -> list[PoEntry]:
    """Parse a gettext catalog: contexts, plurals, multi-line strings, flags, obsolete (#~)."""
    entries: list[PoEntry] = []
    cur: dict | None = None
    last: tuple | None = None  # (field, index) receiving continuation lines
    pending_flags: set[str] = set()

    def finish():
        nonlocal cur
        if cur is not None and cur.get("msgid") is not None:
            strs = [cur["msgstr"][k] for k in sorted(cur["msgstr"])]
            entries.append(PoEntry(msgid=cur["msgid"], msgstr=strs, msgctxt=cur.get("msgctxt"),
                                   msgid_plural=cur.get("msgid_plural"), flags=cur["flags"],
                                   obsolete=cur["obsolete"]))
        cur = None

    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        obsolete = False
        if line.startswith("#~"):
            obsolete = True
            line = line[2:].strip()
            if line.startswith("|"):
                continue  # obsolete previous-msgid
        elif line.startswith("#"):
            if line.startswith("#,"):
                flags = {f.strip() for f in line[2:].split(",") if f.strip()}
                if cur is not None and cur.get("msgstr"):
                    finish()
                pending_flags |= flags
            continue
        if not line:
            continue
        m = _PO_KEY.match(line)
        if m:
            key, idx, value = m.group(1), m.group(2), _po_unquote(m.group(3), lineno)
            if key in ("msgctxt", "msgid") and cur is not None and (
                cur["msgstr"] or (key == "msgctxt") or cur.get("msgid") is not None
            ):
                finish()
            if cur is None:
                cur = {"msgstr": {}, "flags": pending_flags, "obsolete": obsolete}
                pending_flags = set()
            if key.startswith("msgstr"):
                k = int(idx) if idx is not None else 0
                if cur.get("msgid") is None:
                    raise ValueError(f"line {lineno}: msgstr without msgid")
                cur["msgstr"][k] = value
                last = ("msgstr", k)
            else:
                cur[key] = value
                last = (key, None)
            continue
        if line.startswith('"'):
            if cur is None or last is None:
                raise ValueError(f"line {lineno}: string continuation outside an entry")
            value = _po_unquote(line, lineno)
            if last[0] == "msgstr":
                cur["msgstr"][last[1]] += value
            else:
                cur[last[0]] += value
            continue
        raise ValueError(f"line {lineno}: cannot parse {raw!r}")
    finish()
    return entries


def po_segments(entries: Iterable[PoEntry]) -> dict[str, tuple[str, str]]:
    """uid -> (translation, English msgid) for translated, non-fuzzy, current entries.

    The header (msgid "") is skipped. Plural entries give their first form (msgstr[0]) paired
    with the singular msgid. Untranslated entries (empty msgstr) are left out here; strings
    identical to the English are removed later, in ``filter_segments``.
    """
    out = {}
    for e in entries:
        if e.obsolete or e.msgid == "" or not e.translated:
            continue
        uid = f"{e.msgctxt or ''}|{e.msgid}"
        out[uid] = (e.msgstr[0], e.msgid)
    return out
