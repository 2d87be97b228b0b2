"""Java-style .properties files (the older half of Firefox's language packs)."""

from __future__ import annotations

import re

__all__ = ["parse_properties"]

_CONTROL_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f"}


def parse_properties(text: str) -> dict[str, str]:
    """Java-style .properties: comments (#, !), '=' / ':' separators, line continuations,
    \\uXXXX and backslash escapes."""
    out: dict[str, str] = {}
    for line in _logical_lines(text):
        key, value = _split_key_value(line)
        out[_unescape(key)] = _unescape(value)
    return out


def _logical_lines(text: str) -> list[str]:
    """Lines with comments and blank lines dropped and continuations (an odd number of
    trailing backslashes) joined to the next line, its leading blanks removed."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.lstrip()
        if not buf and (not line or line[0] in "#!"):
            continue
        stripped = line.rstrip("\r")
        n_bs = len(stripped) - len(stripped.rstrip("\\"))
        if n_bs % 2 == 1:
            buf += stripped[:-1]
            continue
        logical.append(buf + stripped)
        buf = ""
    if buf:
        logical.append(buf)
    return logical


def _split_key_value(line: str) -> tuple[str, str]:
    """(key, value) of one logical line: the key ends at the first unescaped '=', ':' or blank."""
    i = 0
    while i < len(line):
        c = line[i]
        if c == "\\":
            i += 2
            continue
        if c in "=:" or c.isspace():
            break
        i += 1
    else:
        return line, ""
    rest = line[i:].lstrip()
    if rest[:1] in ("=", ":"):
        rest = rest[1:].lstrip()
    return line[:i], rest


def _unescape(s: str) -> str:
    def rep(m):
        t = m.group(0)
        if t[1] == "u":
            return chr(int(t[2:], 16))
        return _CONTROL_ESCAPES.get(t[1], t[1])
    return re.sub(r"\\(u[0-9A-Fa-f]{4}|.)", rep, s, flags=re.S)
