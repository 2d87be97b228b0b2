"""The file-format parsers: gettext .po, Fluent, .properties, Mallard."""

from __future__ import annotations

import pytest

from lape_kernels.data.formats import (
    mallard_units,
    parse_fluent,
    parse_po,
    parse_properties,
    po_segments,
    resolve_fluent,
)

# --------------------------------------------------------------------------------------------
# gettext .po
# --------------------------------------------------------------------------------------------

PO = r'''# Translator comment
msgid ""
msgstr ""
"Content-Type: text/plain; charset=UTF-8\n"
"Plural-Forms: nplurals=2; plural=(n != 1);\n"

#: file.py:1
msgid "Enter a valid value."
msgstr "Rhowch werth dilys."

#, fuzzy
msgid "This field is required."
msgstr "Mae angen y maes hwn."

msgid "Untranslated sentence here."
msgstr ""

msgctxt "month name"
msgid "May"
msgstr "Mai"

#, python-format
msgid "One apple"
msgid_plural "%(n)s apples"
msgstr[0] "Un afal"
msgstr[1] "%(n)s afal"

msgid ""
"A long message "
"split over lines with a \"quote\"\tand tab."
msgstr ""
"Neges hir "
"wedi'i rhannu \"dyfynnu\"\tа tab."

#~ msgid "Obsolete entry."
#~ msgstr "Cofnod darfodedig."
'''


def test_parse_po_entries():
    entries = parse_po(PO)
    by_id = {(e.msgctxt, e.msgid): e for e in entries}
    assert by_id[(None, "")].msgstr[0].startswith("Content-Type")
    assert by_id[(None, "Enter a valid value.")].msgstr == ["Rhowch werth dilys."]
    assert by_id[(None, "This field is required.")].fuzzy
    assert not by_id[(None, "This field is required.")].translated
    assert not by_id[(None, "Untranslated sentence here.")].translated
    assert by_id[("month name", "May")].msgstr == ["Mai"]
    plural = by_id[(None, "One apple")]
    assert plural.msgid_plural == "%(n)s apples" and plural.msgstr == ["Un afal", "%(n)s afal"]
    assert "python-format" in plural.flags
    long = by_id[(None, 'A long message split over lines with a "quote"\tand tab.')]
    assert long.msgstr == ["Neges hir wedi'i rhannu \"dyfynnu\"\tа tab."]
    assert by_id[(None, "Obsolete entry.")].obsolete


def test_po_segments_keeps_only_current_translations():
    segs = po_segments(parse_po(PO))
    assert segs == {
        "|Enter a valid value.": ("Rhowch werth dilys.", "Enter a valid value."),
        "month name|May": ("Mai", "May"),
        "|One apple": ("Un afal", "One apple"),
        '|A long message split over lines with a "quote"\tand tab.':
            ("Neges hir wedi'i rhannu \"dyfynnu\"\tа tab.",
             'A long message split over lines with a "quote"\tand tab.'),
    }


@pytest.mark.parametrize("bad", ['msgid "x"\nmsgstr "y"\nnonsense', 'msgid "unterminated\n',
                                 '"orphan continuation"\n', 'msgstr "no msgid"\n'])
def test_parse_po_rejects_malformed(bad):
    with pytest.raises(ValueError, match="line"):
        parse_po(bad)


# --------------------------------------------------------------------------------------------
# Fluent
# --------------------------------------------------------------------------------------------

FTL = '''# comment
-brand-short-name = Firefox
-brand-name =
    { $case ->
       *[nom] Mozilla Firefox
        [gen] Mozilla Firefoxes
    }
welcome = Welcome to { -brand-short-name }, the <a data-l10n-name="x">free</a> browser.
multi =
    First line of a message
    continues here.
    .title = Attribute text for { -brand-name(case: "gen") }
    .accesskey = F
tabs = { $count ->
        [one] One tab
       *[other] { $count } tabs
    }
choice = { PLATFORM() ->
        [windows] Options on Windows
       *[other] Preferences everywhere else
    }
literal = Braces { "{" } and { "}" } stay.
dangling = Broken { missing-ref } here.
attr-only =
    .label = Only an attribute here
'''


def test_parse_and_resolve_fluent():
    raw = parse_fluent(FTL)
    assert raw["multi"] == "First line of a message\ncontinues here."
    assert raw["multi.accesskey"] == "F"
    assert "attr-only" not in raw and "attr-only.label" in raw
    res = resolve_fluent(raw)
    assert res["welcome"] == 'Welcome to Firefox, the <a data-l10n-name="x">free</a> browser.'
    assert res["multi.title"] == "Attribute text for Mozilla Firefox"
    assert res["choice"] == "Preferences everywhere else"
    assert res["literal"] == "Braces { and } stay."
    assert res["attr-only.label"] == "Only an attribute here"
    assert "tabs" not in res  # default variant needs $count
    assert "dangling" not in res
    assert "-brand-short-name" not in res


def test_fluent_string_literals_hide_braces_quotes_and_escapes():
    """Inside a placeable a string literal is opaque: its braces do not nest, an escaped quote
    does not end it; outside placeables a quote is just text."""
    ftl = ('quoted = Press "OK" to { "{" }continue{ "}" }.\n'
           'escaped = { $n ->\n'
           '        [one] One { "\\"" } mark\n'
           '       *[other] Quote marks { "\\"" } and { "\\u0041" } here\n'
           '    }\n'
           'text-quote = { $n ->\n'
           '       *[other] A "quoted" word\n'
           '        [one] Never chosen\n'
           '    }\n'
           '    .title = An attribute after a "quote"\n')
    raw = parse_fluent(ftl)
    assert raw["text-quote.title"] == 'An attribute after a "quote"'
    res = resolve_fluent(raw)
    assert res["quoted"] == 'Press "OK" to {continue}.'
    assert res["escaped"] == 'Quote marks " and A here'
    assert res["text-quote"] == 'A "quoted" word'


@pytest.mark.parametrize("pattern", ["Open { brace", "Stray } brace", "{ $n -> [one] no default }",
                                     "{ $n -> *[other unterminated key }", "{ NUMBER($n) }"])
def test_fluent_unresolvable_messages_are_left_out(pattern):
    assert resolve_fluent({"msg": pattern}) == {}


def test_fluent_reference_cycle_is_left_out():
    assert resolve_fluent({"a": "x { b } y", "b": "{ a }", "c": "plain"}) == {"c": "plain"}


# --------------------------------------------------------------------------------------------
# .properties
# --------------------------------------------------------------------------------------------


def test_parse_properties():
    text = ("# comment\n! also comment\nsimple=Hello world\nspaced : Colon value\n"
            "cont = first \\\n    second\nuni=caf\\u00e9 \\n done\nkey\\=with=eq\n  \nempty=\n")
    p = parse_properties(text)
    assert p == {"simple": "Hello world", "spaced": "Colon value", "cont": "first second",
                 "uni": "café \n done", "key=with": "eq", "empty": ""}


def test_parse_properties_edge_cases():
    # a key alone, an escaped blank in a key, an even number of trailing backslashes (a literal
    # backslash, no continuation) and a continuation left open at the end of the file
    text = "lonely\nwith\\ space = v\nslash = a\\\\\nnext = b\nopen = tail \\"
    assert parse_properties(text) == {"lonely": "", "with space": "v", "slash": "a\\",
                                      "next": "b", "open": "tail "}


# --------------------------------------------------------------------------------------------
# Mallard
# --------------------------------------------------------------------------------------------

MALLARD_EN = b'''<page xmlns="http://projectmallard.org/1.0/"
      xmlns:its="http://www.w3.org/2005/11/its" id="x">
  <info><desc>Short description of the page.</desc>
    <credit type="author"><name>Someone</name></credit></info>
  <title>Add an account</title>
  <p>Open the <gui>Activities</gui> overview and
     start typing.</p>
  <comment><cite>Editor</cite><p>Editorial note.</p></comment>
  <code>ls -l</code>
  <p its:translate="no">Do not translate.</p>
  <steps><item><p>Click &amp; wait.</p></item></steps>
</page>'''


def test_mallard_units():
    assert mallard_units(MALLARD_EN) == [
        "Short description of the page.", "Add an account",
        "Open the Activities overview and start typing.", "Click & wait."]
