"""Mozilla Fluent (.ftl), the newer half of Firefox's language packs: raw patterns of a
resource, and their plain text with references and select expressions resolved.

Why resolve at all: a Fluent message is a template; the corpus wants the sentence a user sees.
Term and message references are substituted and a select expression becomes its default
variant; anything that needs a value known only at run time leaves the message out.
"""

from __future__ import annotations

import re
from typing import Iterator, Mapping

__all__ = ["parse_fluent", "resolve_fluent"]

_FTL_ENTRY = re.compile(r"^(-?[A-Za-z][A-Za-z0-9_-]*)[ \t]*=[ \t]?(.*)$")
_FTL_ATTR = re.compile(r"^[ \t]+\.([A-Za-z][A-Za-z0-9_-]*)[ \t]*=[ \t]?(.*)$")
_FTL_REF = re.compile(r"(-?[A-Za-z][A-Za-z0-9_-]*)(\.[A-Za-z][A-Za-z0-9_-]*)?\s*(\(.*\))?", re.S)


class _Unresolvable(Exception):
    """The message needs a run-time value or is malformed: it has no plain text."""


def _outside_literals(s: str, depth: int = 0) -> Iterator[tuple[int, str, int]]:
    """(index, char, depth after it) for each character of `s` outside string literals.

    `depth` counts the open placeables ('{'), never below 0. A '"' opens a string literal only
    inside a placeable (depth > 0: elsewhere it is a quote in the text); inside a literal a
    backslash escapes the next character. Pass depth=1 to scan the inside of a placeable.
    """
    in_literal = False
    i = 0
    while i < len(s):
        c = s[i]
        if in_literal:
            if c == "\\":
                i += 1
            elif c == '"':
                in_literal = False
        elif c == '"' and depth > 0:
            in_literal = True
        else:
            if c == "{":
                depth += 1
            elif c == "}":
                depth = max(0, depth - 1)
            yield i, c, depth
        i += 1


def _brace_depth(s: str) -> int:
    """How many placeables are still open at the end of `s`."""
    depth = 0
    for _, _, depth in _outside_literals(s):
        pass
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


def _match_brace(s: str, i: int) -> int:
    """Index of the '}' closing the '{' at s[i]."""
    for j, c, depth in _outside_literals(s[i + 1:], depth=1):
        if c == "}" and depth == 0:
            return i + 1 + j
    raise _Unresolvable("unbalanced braces")


def _top_level_arrow(expr: str) -> int:
    """Index of the '->' of a select expression (the inside of a placeable), or -1."""
    for j, c, depth in _outside_literals(expr, depth=1):
        if c == "-" and depth == 1 and expr[j + 1:j + 2] == ">":
            return j
    return -1


def _default_variant(variants: str) -> str:
    """The pattern of the '*[key]' variant among the variants of a select expression."""
    keys = []  # (start of the key, end of the key, is the default)
    line_start = True
    skip_to = 0
    for j, c, depth in _outside_literals(variants):
        if j < skip_to:
            continue
        at_top = depth == 0 and c not in "{}"
        if at_top and line_start and (c == "[" or (c == "*" and variants[j + 1:j + 2] == "[")):
            close = variants.find("]", j)
            if close < 0:
                raise _Unresolvable("bad variant key")
            keys.append((j, close + 1, c == "*"))
            skip_to = close + 1
            line_start = False
            continue
        if c == "\n":
            line_start = True
        elif not c.isspace():
            line_start = False
    for n, (_, end_of_key, is_default) in enumerate(keys):
        if is_default:
            end = keys[n + 1][0] if n + 1 < len(keys) else len(variants)
            return variants[end_of_key:end].strip()
    raise _Unresolvable("select expression without a default variant")


def _unescape_ftl_string(s: str) -> str:
    def rep(m):
        t = m.group(0)
        if t[1] in '"\\':
            return t[1]
        return chr(int(t[2:], 16))
    return re.sub(r'\\(?:["\\]|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{6})', rep, s)


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
