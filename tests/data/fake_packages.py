"""Synthetic Debian packages, Firefox language packs, GNOME help pages and a Django wheel for
the corpus tests (the ``fake_cache`` fixture in conftest.py puts them in a corpus cache)."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_deb(path: Path, package: str, version: str, files: dict[str, bytes]) -> None:
    control = f"Package: {package}\nVersion: {version}\nArchitecture: all\n".encode()
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", _tar_xz({"control": control})),
               ("data.tar.xz", _tar_xz(files))]
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(bytes(out))


def xpi(locale: str, ftl: str, props: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("manifest.json", json.dumps({"languages": {locale: {"version": "1"}}}))
        z.writestr(f"browser/localization/{locale}/browser/test.ftl", ftl)
        z.writestr(f"chrome/{locale}/locale/{locale}/global/test.properties", props)
    return buf.getvalue()


def page(lang: str | None, title: str, paras: list[str]) -> bytes:
    ps = "".join(f"<p>{p}</p>" for p in paras)
    attr = f' xml:lang="{lang}"' if lang else ""
    return (f'<page xmlns="http://projectmallard.org/1.0/" id="p"{attr}><title>{title}</title>'
            f'{ps}</page>').encode()


FTL_EN = """-brand-short-name = Firefox
intro = { -brand-short-name } keeps your browsing history private on this computer.
same = This string stays in English for every locale here.
label = Settings
count = { $n } sites are blocked by the browser right now.
"""
FTL_CY = """-brand-short-name = Firefox
intro = Mae { -brand-short-name } yn cadw eich hanes pori yn breifat ar y cyfrifiadur hwn.
same = This string stays in English for every locale here.
label = Gosodiadau
count = Mae { $n } gwefan wedi eu rhwystro gan y porwr ar hyn o bryd.
"""
FTL_GL = """-brand-short-name = Firefox
intro = { -brand-short-name } mantén o seu historial de navegación privado neste computador.
"""
PROPS_EN = "warn=The page you are trying to view cannot be shown right now.\n"
PROPS_CY = "warn=Nid oes modd dangos y dudalen rydych yn ceisio ei gweld ar hyn o bryd.\n"
PO_CY = '''msgid ""
msgstr "Content-Type: text/plain; charset=UTF-8\\n"

msgid "Enter a valid email address, please."
msgstr "Rhowch gyfeiriad e-bost dilys, os gwelwch yn dda."

#, fuzzy
msgid "This fuzzy entry must not be used at all."
msgstr "Ni ddylid defnyddio'r cofnod niwlog hwn o gwbl."
'''
PO_EN = '''msgid ""
msgstr ""

msgid "Enter a valid email address, please."
msgstr ""

msgid "This fuzzy entry must not be used at all."
msgstr ""
'''
