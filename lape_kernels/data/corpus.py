"""Offline multilingual corpus built from translations shipped in Debian and PyPI packages.

Why these sources: LAPE statistics and perplexity need real sentences in many languages, and
the only things reachable here are package registries. Three sources, all translations of one
English original, so every segment has a source id that aligns it with English:

* ``gnome-help``: Debian ``gnome-user-docs`` (GNOME desktop help, CC-BY-SA-3.0). Mallard pages,
  paragraphs of prose, ~40 languages. Segment id = ``guide/page#n`` (n-th translatable block).
* ``firefox``: Debian ``firefox-esr-l10n-<locale>`` (Firefox language packs, MPL-2.0). Fluent
  (.ftl) and .properties messages, full UI sentences, ~100 locales incl. cy, eu, ga, is, ka, mk,
  ne, af. Segment id = ``file:message-id``. English reference = the en-GB pack.
* ``django``: PyPI ``django`` wheel (BSD-3-Clause), gettext .po catalogs, ~100 languages, short
  UI sentences. Segment id = ``catalog|msgctxt|msgid``; English = msgid.

Packages are fetched once into the cache (``apt-get download``, ``pip download --no-deps``),
parsed straight from the archives, and the per-(source, language) segments are cached as JSON.
``build_corpus`` filters (untranslated, too short, not prose, duplicates), splits by a hash of the
source id (the same ids land in validation for every language, so validation sets are
parallel), and saves one ``DatasetDict`` per language plus a JSON manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import unicodedata
import warnings
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .models import cache_root, fetch_wheel

__all__ = [
    "DEFAULT_LANGUAGES",
    "SOURCES",
    "CorpusSourceError",
    "PoEntry",
    "available_languages",
    "build_corpus",
    "corpus_dir",
    "corpus_manifest",
    "filter_segments",
    "load_text_dataset",
    "mallard_units",
    "parallel_sentences",
    "parse_fluent",
    "parse_po",
    "parse_properties",
    "po_segments",
    "resolve_fluent",
    "split_of",
    "strip_markup",
]

FORMAT_VERSION = 2

#: English + high-resource references + under-resourced targets that the sources cover well.
DEFAULT_LANGUAGES = (
    "en", "de", "fr", "es", "ru",
    "gl", "cy", "eu", "is", "ga", "ka", "mk", "ne", "af", "lv", "sl",
)

DJANGO_VERSION = "5.2.19"  # newest Django whose wheel installs on Python 3.10/3.11

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
_GNOME_LANGS = (
    "as ca cs da de el es fa fi fr gl gu he hi hr hu id it ja kn ko lt lv mr nl pa pl pt pt_BR "
    "ro ru sl sr sr_Latn sv ta te tr uk vi zh_CN"
).split()
_DJANGO_LANGS = (
    "af ar ar_DZ ast az be bg bn br bs ca ckb cs cy da de de_CH dsb el eo es es_AR es_CO es_MX "
    "es_NI es_PR es_VE et eu fa fi fr fr_BE fr_CA fr_CH fy ga gd gl he hi hr hsb hu hy ia id ig "
    "io is it ja ka kab kk km kn ko ky lb lt lv mk ml mn mr ms my nb ne nl nn os pa pl pt pt_BR "
    "ro ru sk sl sq sr sr_Latn sv sw ta te tg th tk tr tt udm ug uk ur uz vi zh_CN zh_TW"
).split()


class CorpusSourceError(RuntimeError):
    """A source package could not be fetched or read."""


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


def _firefox_lang(locale: str) -> str:
    return _FIREFOX_PLAIN.get(locale) or canonical_lang(locale)


# --------------------------------------------------------------------------------------------
# text cleaning
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# gettext .po
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Mozilla Fluent (.ftl) and .properties
# --------------------------------------------------------------------------------------------

_FTL_ENTRY = re.compile(r"^(-?[A-Za-z][A-Za-z0-9_-]*)[ \t]*=[ \t]?(.*)$")
_FTL_ATTR = re.compile(r"^[ \t]+\.([A-Za-z][A-Za-z0-9_-]*)[ \t]*=[ \t]?(.*)$")


def _brace_depth(s: str, depth: int = 0) -> int:
    in_str = False
    i = 0
    while i < len(s):
        c = s[i]
        if in_str:
            if c == "\\":
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"' and depth > 0:
            in_str = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth = max(0, depth - 1)
        i += 1
    return depth


def parse_fluent(text: str) -> dict[str, str]:
    """Raw patterns of a Fluent resource: 'id' (message value), 'id.attr', '-term', '-term.attr'.

    Continuation lines are joined with newlines (indentation dropped); comments end an entry.
    """
    entries: dict[str, str] = {}
    entry: str | None = None
    key: str | None = None
    lines: list[str] = []

    def flush():
        if key is not None:
            value = "\n".join(lines).strip()
            if value:
                entries[key] = value

    for raw in text.splitlines():
        if not raw.strip():
            if key is not None:
                lines.append("")
            continue
        if raw[0] == "#":
            flush()
            entry = key = None
            lines = []
            continue
        if raw[0] not in " \t":
            m = _FTL_ENTRY.match(raw)
            flush()
            if m:
                entry = key = m.group(1)
                lines = [m.group(2)]
            else:  # junk line: drop it and anything attached to it
                entry = key = None
                lines = []
            continue
        if entry is None:
            continue
        a = _FTL_ATTR.match(raw)
        if a and _brace_depth("\n".join(lines)) == 0:
            flush()
            key = f"{entry}.{a.group(1)}"
            lines = [a.group(2)]
            continue
        lines.append(raw.strip())
    flush()
    return entries


class _Unresolvable(Exception):
    pass


def _match_brace(s: str, i: int) -> int:
    """Index of the '}' closing the '{' at s[i]."""
    depth, in_str, j = 0, False, i
    while j < len(s):
        c = s[j]
        if in_str:
            if c == "\\":
                j += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return j
        j += 1
    raise _Unresolvable("unbalanced braces")


def _top_level_arrow(expr: str) -> int:
    depth, in_str = 0, False
    for j, c in enumerate(expr):
        if in_str:
            if c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "-" and depth == 0 and expr[j + 1:j + 2] == ">":
            return j
    return -1


def _default_variant(variants: str) -> str:
    starts = []  # (pos_of_key_start, pos_after_key, is_default)
    depth, in_str, line_start = 0, False, True
    j = 0
    while j < len(variants):
        c = variants[j]
        if in_str:
            if c == '"':
                in_str = False
        elif c == '"' and depth > 0:
            in_str = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif depth == 0 and line_start and (c == "[" or (c == "*" and variants[j + 1:j + 2] == "[")):
            close = variants.find("]", j)
            if close < 0:
                raise _Unresolvable("bad variant key")
            starts.append((j, close + 1, c == "*"))
            j = close + 1
            line_start = False
            continue
        if c == "\n":
            line_start = True
        elif not c.isspace():
            line_start = False
        j += 1
    for n, (s, e, is_default) in enumerate(starts):
        if is_default:
            end = starts[n + 1][0] if n + 1 < len(starts) else len(variants)
            return variants[e:end].strip()
    raise _Unresolvable("select expression without a default variant")


def _unescape_ftl_string(s: str) -> str:
    def rep(m):
        t = m.group(0)
        if t[1] in '"\\':
            return t[1]
        return chr(int(t[2:], 16))
    return re.sub(r'\\(?:["\\]|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{6})', rep, s)


_FTL_REF = re.compile(r"(-?[A-Za-z][A-Za-z0-9_-]*)(\.[A-Za-z][A-Za-z0-9_-]*)?\s*(\(.*\))?", re.S)


def _resolve_pattern(pattern: str, entries: Mapping[str, str], depth: int) -> str:
    if depth > 16:
        raise _Unresolvable("reference cycle")
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "{":
            j = _match_brace(pattern, i)
            out.append(_resolve_placeable(pattern[i + 1:j], entries, depth))
            i = j + 1
        elif c == "}":
            raise _Unresolvable("stray }")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _resolve_placeable(expr: str, entries: Mapping[str, str], depth: int) -> str:
    arrow = _top_level_arrow(expr)
    if arrow >= 0:
        return _resolve_pattern(_default_variant(expr[arrow + 2:]), entries, depth + 1)
    e = expr.strip()
    if len(e) >= 2 and e[0] == '"' and e[-1] == '"':
        return _unescape_ftl_string(e[1:-1])
    if e.startswith("{") and e.endswith("}"):
        return _resolve_placeable(e[1:-1], entries, depth + 1)
    m = _FTL_REF.fullmatch(e)
    if m and not (m.group(3) and not m.group(1).startswith("-")):  # FUNCTION(...) unresolvable
        key = m.group(1) + (m.group(2) or "")
        if key in entries:
            return _resolve_pattern(entries[key], entries, depth + 1)
    raise _Unresolvable(f"cannot resolve {{{expr}}}")


def resolve_fluent(entries: Mapping[str, str]) -> dict[str, str]:
    """Plain text of each message (not terms): term/message references substituted, select
    expressions reduced to their default variant. Messages needing a runtime variable
    ({ $x }, NUMBER(...)) are left out: with a hole they are not natural sentences."""
    out = {}
    for key, pattern in entries.items():
        if key.startswith("-"):
            continue
        try:
            out[key] = _resolve_pattern(pattern, entries, 0)
        except _Unresolvable:
            pass
    return out


def parse_properties(text: str) -> dict[str, str]:
    """Java-style .properties: comments (#, !), '=' / ':' separators, line continuations,
    \\uXXXX and backslash escapes."""
    out: dict[str, str] = {}
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.lstrip() if not buf else raw.lstrip()
        if not buf and (not line or line[0] in "#!"):
            continue
        # odd number of trailing backslashes -> continuation
        stripped = line.rstrip("\r")
        n_bs = len(stripped) - len(stripped.rstrip("\\"))
        if n_bs % 2 == 1:
            buf += stripped[:-1]
            continue
        logical.append(buf + stripped)
        buf = ""
    if buf:
        logical.append(buf)
    for line in logical:
        i, key_end = 0, None
        while i < len(line):
            c = line[i]
            if c == "\\":
                i += 2
                continue
            if c in "=:" or c.isspace():
                key_end = i
                break
            i += 1
        if key_end is None:
            key, value = line, ""
        else:
            key = line[:key_end]
            rest = line[key_end:].lstrip()
            if rest[:1] in ("=", ":"):
                rest = rest[1:].lstrip()
            value = rest
        out[_prop_unescape(key)] = _prop_unescape(value)
    return out


def _prop_unescape(s: str) -> str:
    def rep(m):
        t = m.group(0)
        if t[1] == "u":
            return chr(int(t[2:], 16))
        return {"n": "\n", "t": "\t", "r": "\r", "f": "\f"}.get(t[1], t[1])
    return re.sub(r"\\(u[0-9A-Fa-f]{4}|.)", rep, s, flags=re.S)


# --------------------------------------------------------------------------------------------
# Mallard (GNOME help)
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# fetching packages
# --------------------------------------------------------------------------------------------

def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def apt_download(package: str, dest: Path) -> Path:
    """The .deb of `package` in `dest`, fetched with `apt-get download` (no root) if absent."""
    dest.mkdir(parents=True, exist_ok=True)
    have = sorted(dest.glob(f"{package}_*.deb"))
    if have:
        return have[-1]
    if shutil.which("apt-get") is None:
        raise CorpusSourceError(
            f"cannot fetch Debian package {package!r}: apt-get not found (the corpus needs a "
            "Debian/Ubuntu machine, or copy the .deb into {dest})")
    tmp = dest / f".tmp-{package}-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    try:
        for attempt in range(2):
            r = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True,
                               text=True)
            debs = sorted(tmp.glob(f"{package}_*.deb"))
            if r.returncode == 0 and debs:
                final = dest / debs[-1].name
                os.replace(debs[-1], final)
                return final
            missing = "Unable to locate package" in r.stderr or "has no installation candidate" in r.stderr
            if attempt == 0 and missing:
                if not _is_root():
                    raise CorpusSourceError(
                        f"apt-get cannot find {package!r}: the package lists are missing or "
                        "stale. Run `sudo apt-get update` once (needs root), then retry.")
                subprocess.run(["apt-get", "update"], capture_output=True, text=True)
                continue
            if missing:
                raise LookupError(f"Debian package {package!r} does not exist")
            raise CorpusSourceError(f"`apt-get download {package}` failed:\n{r.stderr.strip()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    raise CorpusSourceError(f"`apt-get download {package}` failed")


def _ar_members(data: bytes) -> dict[str, bytes]:
    if not data.startswith(b"!<arch>\n"):
        raise CorpusSourceError("not a Debian package (ar archive)")
    out, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        out[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    return out


def _deb_tar(deb: Path, prefix: str) -> tarfile.TarFile:
    members = _ar_members(deb.read_bytes())
    for name, blob in members.items():
        if name.startswith(prefix + ".tar"):
            if name.endswith(".zst"):
                raise CorpusSourceError(f"{deb.name}: zstd-compressed {name} is not supported")
            return tarfile.open(fileobj=io.BytesIO(blob), mode="r:*")
    raise CorpusSourceError(f"{deb.name}: no {prefix}.tar.* member")


def deb_version(deb: Path) -> str:
    with _deb_tar(deb, "control") as tf:
        for m in tf.getmembers():
            if m.name.lstrip("./") == "control":
                for line in tf.extractfile(m).read().decode().splitlines():
                    if line.startswith("Version:"):
                        return line.split(":", 1)[1].strip()
    raise CorpusSourceError(f"{deb.name}: no Version in control")


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------

def _read_gnome(pkg_path: Path, langs: Sequence[str]) -> dict[str, dict[str, tuple[str, str | None]]]:
    """lang -> uid -> (text, english). English = the C page unit at the same index."""
    want = {"C": "en"}
    for lang in langs:
        for d in _GNOME_LANGS:
            if canonical_lang(d) == lang:
                want[d.replace("sr_Latn", "sr@latin")] = lang
    pages: dict[str, dict[str, list[str]]] = {d: {} for d in want}
    with _deb_tar(pkg_path, "data") as tf:
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
    out: dict[str, dict[str, tuple[str, str | None]]] = {}
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


def _firefox_package(lang: str) -> str:
    for loc in _FIREFOX_LOCALES:
        if _firefox_lang(loc) == lang:
            return f"firefox-esr-l10n-{loc}"
    raise KeyError(lang)


# Fluent attributes that hold CSS, shortcut keys or sizes rather than words
_FIREFOX_NON_TEXT_ATTRS = frozenset({"style", "accesskey", "key", "commandkey", "keycode",
                                     "width", "height", "modifiers"})


def _read_firefox_pack(deb: Path) -> dict[str, str]:
    """uid -> text of one language pack (Fluent messages resolved, .properties values)."""
    xpi = None
    with _deb_tar(deb, "data") as tf:
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


def _read_firefox(cache: Path, langs: Sequence[str]) -> dict[str, dict[str, tuple[str, str | None]]]:
    english = _read_firefox_pack(apt_download("firefox-esr-l10n-en-gb", cache))
    out = {}
    for lang in langs:
        deb = apt_download(_firefox_package(lang), cache)
        texts = english if lang == "en" else _read_firefox_pack(deb)
        out[lang] = {uid: (t, english.get(uid)) for uid, t in texts.items()}
    return out


def _django_dirs(lang: str) -> list[str]:
    rev = {"zh_CN": "zh_Hans", "zh_TW": "zh_Hant"}
    return [rev.get(lang, lang)]


def _read_django(wheel: Path, langs: Sequence[str]) -> dict[str, dict[str, tuple[str, str | None]]]:
    out: dict[str, dict[str, tuple[str, str | None]]] = {lang: {} for lang in langs}
    dirs = {d: lang for lang in langs for d in _django_dirs(lang)}
    with zipfile.ZipFile(wheel) as z:
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


SOURCES: dict[str, dict] = {
    "gnome-help": {
        "origin": "debian", "package": "gnome-user-docs", "license": "CC-BY-SA-3.0",
        "homepage": "https://gitlab.gnome.org/GNOME/gnome-user-docs",
        "languages": tuple(["en"] + [canonical_lang(d) for d in _GNOME_LANGS]),
    },
    "firefox": {
        "origin": "debian", "package": "firefox-esr-l10n-<locale>", "license": "MPL-2.0",
        "homepage": "https://hg.mozilla.org/l10n-central",
        "languages": tuple(sorted({_firefox_lang(loc) for loc in _FIREFOX_LOCALES})),
    },
    "django": {
        "origin": "pypi", "package": f"django=={DJANGO_VERSION}", "license": "BSD-3-Clause",
        "homepage": "https://www.djangoproject.com/",
        "languages": tuple(["en"] + [canonical_lang(d) for d in _DJANGO_LANGS]),
    },
}
_DEFAULT_SOURCES = ("gnome-help", "firefox", "django")


def available_languages(sources: Sequence[str] | None = None) -> list[str]:
    """Languages that at least one of `sources` (default all) ships."""
    sources = _check_sources(sources)
    return sorted({lang for s in sources for lang in SOURCES[s]["languages"]})


def _check_sources(sources) -> tuple[str, ...]:
    if sources is None:
        return _DEFAULT_SOURCES
    if isinstance(sources, str):
        sources = (sources,)
    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources:
        raise ValueError(f"sources must be a non-empty subset of {sorted(SOURCES)}, got {sources!r}")
    return tuple(sources)


def corpus_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Corpus cache: `cache_dir`, else $LAPE_KERNELS_CACHE/corpus, else ~/.cache/lape_kernels/corpus."""
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "corpus"


def _atomic_write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _source_segments(source: str, langs: Sequence[str], root: Path) -> tuple[dict, dict]:
    """(lang -> uid -> (text, english)), provenance — cached as JSON per (source, version, lang)."""
    spec = SOURCES[source]
    langs = [lang for lang in langs if lang in spec["languages"]]
    downloads = root / "downloads"
    result: dict[str, dict] = {}
    prov: dict[str, dict] = {}
    if not langs:
        return result, prov
    if source == "gnome-help":
        deb = apt_download("gnome-user-docs", downloads)
        packages = {lang: deb for lang in langs}
    elif source == "firefox":
        packages = {"_en": apt_download("firefox-esr-l10n-en-gb", downloads)}
        for lang in list(langs):
            try:
                packages[lang] = apt_download(_firefox_package(lang), downloads)
            except LookupError as e:  # a language pack dropped from the archive: skip it
                warnings.warn(f"firefox source: {e}; language {lang!r} skipped")
                langs.remove(lang)
    else:
        wheel = fetch_wheel(f"django=={DJANGO_VERSION}", downloads)
        packages = {lang: wheel for lang in langs}
    todo = []
    for lang in langs:
        pkg = packages[lang]
        version = deb_version(pkg) if pkg.suffix == ".deb" else DJANGO_VERSION
        pname = pkg.name.split("_")[0] if pkg.suffix == ".deb" else "django"
        prov[lang] = {"source": source, "package": pname, "version": version,
                      "origin": spec["origin"], "license": spec["license"],
                      "homepage": spec["homepage"], "file": pkg.name}
        if source == "firefox":
            prov[lang]["english_reference"] = {"package": "firefox-esr-l10n-en-gb",
                                               "version": deb_version(packages["_en"])}
        cache = root / "segments" / source / f"v{FORMAT_VERSION}" / f"{pname}_{version}" / f"{lang}.json"
        if source == "firefox":
            cache = cache.with_name(f"{lang}.en-gb_{deb_version(packages['_en'])}.json")
        prov[lang]["_cache"] = cache
        if cache.exists():
            result[lang] = {k: tuple(v) for k, v in json.loads(cache.read_text("utf-8")).items()}
        else:
            todo.append(lang)
    if todo:
        if source == "gnome-help":
            parsed = _read_gnome(packages[todo[0]], todo)
        elif source == "firefox":
            parsed = _read_firefox(downloads, todo)
        else:
            parsed = _read_django(packages[todo[0]], todo)
        for lang in todo:
            segs = parsed.get(lang, {})
            _atomic_write_json(prov[lang]["_cache"], segs)
            result[lang] = segs
    for p in prov.values():
        p.pop("_cache")
    return result, prov


def filter_segments(
    segments: Mapping[str, tuple[str, str | None]],
    *,
    lang: str,
    english_texts: set[str] | frozenset = frozenset(),
    min_chars: int = 30,
) -> dict[str, str]:
    """uid -> clean text: markup stripped; untranslated (identical to its English source, or to
    any English string of the source when unaligned), placeholder-bearing and non-prose
    segments removed. For lang 'en' nothing is 'untranslated'."""
    out = {}
    for uid, (text, eng) in segments.items():
        clean = strip_markup(text)
        if lang != "en":
            if eng is not None and clean == strip_markup(eng):
                continue
            if clean in english_texts:
                continue
        if has_placeholder(clean) or not looks_like_prose(clean, min_chars):
            continue
        out[uid] = clean
    return out


def split_of(source_id: str, val_fraction: float, seed: int = 0) -> str:
    """'train' or 'validation' from a hash of the source id: stable across runs, machines and
    languages (a sentence and its translations share a split)."""
    h = hashlib.sha256(f"{seed}\x00{source_id}".encode()).digest()
    return "validation" if int.from_bytes(h[:8], "big") / 2.0**64 < val_fraction else "train"


def _dedup_and_split(rows: Iterable[tuple[str, str, str]], val_fraction: float, seed: int):
    """rows (source, uid, text) -> {'train': [...], 'validation': [...]} of dicts; the first row
    (in sorted id order) of each distinct text is kept."""
    seen: set[str] = set()
    splits: dict[str, list] = {"train": [], "validation": []}
    for source, uid, text in sorted(rows):
        if text in seen:
            continue
        seen.add(text)
        sid = f"{source}:{uid}"
        splits[split_of(sid, val_fraction, seed)].append({"text": text, "id": sid, "source": source})
    return splits


def _check_langs(languages) -> list[str]:
    if languages is None:
        return list(DEFAULT_LANGUAGES)
    if isinstance(languages, str):
        languages = [languages]
    langs = [canonical_lang(x) for x in languages]
    if not langs:
        raise ValueError("languages must not be empty")
    return list(dict.fromkeys(langs))


def build_corpus(
    languages: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    min_chars: int = 30,
    val_fraction: float = 0.1,
    seed: int = 0,
    sources: Sequence[str] | None = None,
    rebuild: bool = False,
):
    """lang -> DatasetDict(train, validation) with columns text, id, source.

    `languages`: codes like 'cy', 'pt_BR' (default DEFAULT_LANGUAGES; "all" = every language
    a source ships — downloads ~100 language packs). Built once into the cache (fetching the
    packages on first use), then loaded from disk; `rebuild=True` rebuilds the datasets from the
    cached segments.
    Provenance (package, version, licence) goes into each Dataset's info and into
    ``manifest.json`` beside the built datasets.
    """
    from datasets import Features, Value, load_from_disk

    srcs = _check_sources(sources)
    langs = available_languages(srcs) if languages == "all" else _check_langs(languages)
    if not isinstance(min_chars, int) or min_chars < 1:
        raise ValueError(f"min_chars must be a positive int, got {min_chars!r}")
    if not (0.0 <= val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    unknown = [lang for lang in langs if lang not in available_languages(srcs)]
    if unknown:
        raise ValueError(f"no source in {list(srcs)} ships languages {unknown}; "
                         f"available: {available_languages(srcs)}")
    root = corpus_dir(cache_dir)
    key = hashlib.sha256(json.dumps([FORMAT_VERSION, sorted(srcs), min_chars, val_fraction, seed])
                         .encode()).hexdigest()[:12]
    built = root / "built" / key
    out = {}
    missing = []
    for lang in langs:
        d = built / lang
        if not rebuild and (d / ".complete").exists():
            out[lang] = load_from_disk(str(d))
        else:
            missing.append(lang)
    if not missing:
        return out

    need = sorted(set(missing) | {"en"})
    segs: dict[str, dict[str, dict]] = {}
    prov: dict[str, dict[str, dict]] = {}
    for s in srcs:
        segs[s], prov[s] = _source_segments(s, need, root)
    manifest_path = built / "manifest.json"
    manifest = json.loads(manifest_path.read_text("utf-8")) if manifest_path.exists() else {}
    manifest.update({"format_version": FORMAT_VERSION, "sources": list(srcs),
                     "params": {"min_chars": min_chars, "val_fraction": val_fraction, "seed": seed}})
    features = Features({"text": Value("string"), "id": Value("string"), "source": Value("string")})
    with _quiet_datasets():
        _build_languages(missing, srcs, segs, prov, manifest, manifest_path, built, features,
                         min_chars, val_fraction, seed)
    return {lang: load_from_disk(str(built / lang)) for lang in langs}


@contextlib.contextmanager
def _quiet_datasets():
    """No per-language 'Saving the dataset' progress bars."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def _build_languages(missing, srcs, segs, prov, manifest, manifest_path, built, features,
                     min_chars, val_fraction, seed):
    from datasets import Dataset, DatasetDict, DatasetInfo

    for lang in missing:
        rows = []
        used = []
        for s in srcs:
            if lang not in segs[s]:
                continue
            eng_all = {strip_markup(t) for t, _ in segs[s].get("en", {}).values()}
            kept = filter_segments(segs[s][lang], lang=lang, english_texts=eng_all,
                                   min_chars=min_chars)
            rows.extend((s, uid, text) for uid, text in kept.items())
            used.append(dict(prov[s][lang], segments_kept=len(kept),
                             segments_total=len(segs[s][lang])))
        splits = _dedup_and_split(rows, val_fraction, seed)
        if not splits["train"]:
            raise CorpusSourceError(f"no usable text for language {lang!r} in {list(srcs)}")
        licenses = sorted({u["license"] for u in used})
        desc = (f"lape_kernels offline corpus, language {lang}: translated segments from "
                + "; ".join(f"{u['package']} {u['version']} ({u['origin']}, {u['license']}, "
                            f"{u['segments_kept']} segments)" for u in used)
                + f". Untranslated, non-prose and duplicate segments removed; split by "
                  f"sha256(seed={seed}, source id) with val_fraction={val_fraction}.")
        dd = DatasetDict({
            split: Dataset.from_list(rows_, features=features, info=DatasetInfo(
                description=desc, license=" AND ".join(licenses), features=features,
                homepage=" ".join(SOURCES[u["source"]]["homepage"] for u in used),
                dataset_name="lape_kernels_corpus", config_name=lang))
            for split, rows_ in splits.items()
        })
        d = built / lang
        tmp = built / f".{lang}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        dd.save_to_disk(str(tmp))
        (tmp / ".complete").write_text("ok\n")
        if d.exists():
            shutil.rmtree(d)
        os.replace(tmp, d)
        manifest.setdefault("languages", {})[lang] = {
            "sources": used,
            "license": " AND ".join(licenses),
            "rows": {k: len(v) for k, v in splits.items()},
            "chars": {k: sum(len(r["text"]) for r in v) for k, v in splits.items()},
        }
        _atomic_write_json(manifest_path, manifest)


def corpus_manifest(cache_dir: str | os.PathLike | None = None, min_chars: int = 30,
                    val_fraction: float = 0.1, seed: int = 0,
                    sources: Sequence[str] | None = None) -> dict:
    """The manifest written by ``build_corpus`` with the same parameters ({} if not built)."""
    srcs = _check_sources(sources)
    key = hashlib.sha256(json.dumps([FORMAT_VERSION, sorted(srcs), min_chars, val_fraction, seed])
                         .encode()).hexdigest()[:12]
    p = corpus_dir(cache_dir) / "built" / key / "manifest.json"
    return json.loads(p.read_text("utf-8")) if p.exists() else {}


def parallel_sentences(
    lang: str,
    other: str = "en",
    n: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    min_chars: int = 30,
    sources: Sequence[str] | None = None,
    split: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> list[tuple[str, str]]:
    """Pairs (text in `lang`, text in `other`) that translate the same source message.

    Both sides pass the corpus filters (so neither is an untranslated copy of the English).
    Pairs are ordered by a hash of the source id (a spread sample, not one file); `n` takes the
    first n. `split` ('train'/'validation') keeps only ids of that split.
    """
    lang, other = canonical_lang(lang), canonical_lang(other)
    if lang == other:
        raise ValueError(f"lang and other must differ, both are {lang!r}")
    if n is not None and (not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be a non-negative int or None, got {n!r}")
    if split not in (None, "train", "validation"):
        raise ValueError(f"split must be None, 'train' or 'validation', got {split!r}")
    srcs = _check_sources(sources)
    root = corpus_dir(cache_dir)
    avail = available_languages(srcs)
    for x in (lang, other):
        if x not in avail:
            raise ValueError(f"no source in {list(srcs)} ships language {x!r}")
    pairs = []
    for s in srcs:
        if lang not in SOURCES[s]["languages"] or other not in SOURCES[s]["languages"]:
            continue
        segs, _ = _source_segments(s, sorted({lang, other, "en"}), root)
        eng_all = {strip_markup(t) for t, _ in segs.get("en", {}).values()}
        a = filter_segments(segs.get(lang, {}), lang=lang, english_texts=eng_all,
                            min_chars=min_chars)
        b = filter_segments(segs.get(other, {}), lang=other, english_texts=eng_all,
                            min_chars=min_chars)
        for uid in a.keys() & b.keys():
            if s == "gnome-help" and re.search(r"#u\d+$", uid):  # unaligned GNOME units
                continue
            sid = f"{s}:{uid}"
            if split is not None and split_of(sid, val_fraction, seed) != split:
                continue
            pairs.append((hashlib.sha256(sid.encode()).hexdigest(), a[uid], b[uid]))
    pairs.sort()
    seen, out = set(), []
    for _, x, y in pairs:
        if (x, y) in seen:
            continue
        seen.add((x, y))
        out.append((x, y))
        if n is not None and len(out) >= n:
            break
    return out


# --------------------------------------------------------------------------------------------
# any HF datasets input
# --------------------------------------------------------------------------------------------

_FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json",
                  ".csv": "csv", ".parquet": "parquet"}


def load_text_dataset(spec, text_column: str = "text", val_fraction: float | None = None,
                      seed: int = 0, **load_kwargs):
    """A DatasetDict with a 'text' column from any datasets input.

    `spec`: a Dataset/DatasetDict; a directory saved with save_to_disk; a text/json/csv/parquet
    file, a list of files, a dict split -> file(s), or a directory of such files; or a dataset
    name that `load_dataset` resolves offline. `text_column` is renamed to 'text'. With
    `val_fraction` and no 'validation' split, one is carved from 'train' by a hash of the text.
    """
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    if isinstance(spec, Dataset):
        dd = DatasetDict({"train": spec})
    elif isinstance(spec, DatasetDict):
        dd = spec
    elif isinstance(spec, (dict, list, tuple)) and spec:
        files = list(spec.values()) if isinstance(spec, dict) else list(spec)
        flat = [f for v in files for f in ([v] if isinstance(v, (str, os.PathLike)) else v)]
        builder = _builder_for([Path(f) for f in flat])
        data_files = ({k: ([str(x) for x in v] if isinstance(v, (list, tuple)) else str(v))
                       for k, v in spec.items()} if isinstance(spec, dict)
                      else {"train": [str(f) for f in flat]})
        dd = load_dataset(builder, data_files=data_files, **load_kwargs)
    elif isinstance(spec, (str, os.PathLike)):
        p = Path(spec).expanduser()
        if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
            loaded = load_from_disk(str(p))
            dd = loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
        elif p.is_file():
            dd = load_dataset(_builder_for([p]), data_files={"train": str(p)}, **load_kwargs)
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _FILE_BUILDERS)
            if not files:
                raise ValueError(f"{p} is neither a saved dataset nor holds text/json/csv/parquet files")
            splits: dict[str, list[str]] = {}
            for f in files:
                stem = f.stem.lower()
                name = next((s for s in ("validation", "valid", "val", "test", "train") if s in stem), "train")
                name = "validation" if name in ("valid", "val") else name
                splits.setdefault(name, []).append(str(f))
            dd = load_dataset(_builder_for([Path(f) for f in files]), data_files=splits, **load_kwargs)
        else:
            try:
                loaded = load_dataset(str(spec), **load_kwargs)
            except Exception as e:  # noqa: BLE001 - re-raised with the reason attached
                raise ValueError(f"cannot load dataset {spec!r}: not a path and load_dataset "
                                 f"failed ({type(e).__name__}: {e})") from e
            dd = loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    else:
        raise TypeError(f"spec must be a Dataset, DatasetDict, path, list/dict of files or a "
                        f"dataset name, got {type(spec).__name__}")

    fixed = {}
    for name, ds in dd.items():
        if text_column not in ds.column_names:
            raise ValueError(f"split {name!r} has no column {text_column!r}; columns: {ds.column_names}")
        if text_column != "text":
            if "text" in ds.column_names:
                ds = ds.remove_columns("text")
            ds = ds.rename_column(text_column, "text")
        fixed[name] = ds
    dd = DatasetDict(fixed)
    if val_fraction is not None and "validation" not in dd:
        if not (0.0 < val_fraction < 1.0):
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if "train" not in dd:
            raise ValueError(f"cannot carve a validation split: no 'train' split in {list(dd)}")
        train = dd["train"]
        is_val = [split_of(t or "", val_fraction, seed) == "validation" for t in train["text"]]
        dd["validation"] = train.select([i for i, v in enumerate(is_val) if v])
        dd["train"] = train.select([i for i, v in enumerate(is_val) if not v])
    return dd


def _builder_for(paths: Sequence[Path]) -> str:
    kinds = {_FILE_BUILDERS.get(p.suffix.lower()) for p in paths}
    if None in kinds:
        bad = [str(p) for p in paths if p.suffix.lower() not in _FILE_BUILDERS]
        raise ValueError(f"unsupported file type(s) {bad}; use one of {sorted(_FILE_BUILDERS)}")
    if len(kinds) != 1:
        raise ValueError(f"mixed file types {sorted(kinds)}; pass one kind of file")
    return kinds.pop()
