"""The ``fake_cache`` fixture: a corpus cache whose downloads/ already holds synthetic
packages, so the whole corpus pipeline runs offline."""

from __future__ import annotations

import subprocess
import zipfile

import pytest
from fake_packages import (
    FTL_CY,
    FTL_EN,
    FTL_GL,
    PO_CY,
    PO_EN,
    PROPS_CY,
    PROPS_EN,
    make_deb,
    page,
    xpi,
)

from lape_kernels.data.sources import DJANGO_VERSION


@pytest.fixture()
def fake_cache(tmp_path, monkeypatch):
    """A corpus cache whose downloads/ already holds synthetic packages; any attempt to reach
    apt or pip fails the test."""
    dl = tmp_path / "corpus" / "downloads"
    dl.mkdir(parents=True)
    help_root = "usr/share/help"
    en_paras = ["Open the Activities overview and start typing.",
                "Your files are kept on the computer until you delete them.",
                "Your files are kept on the computer until you delete them.",
                "This paragraph is never translated by anyone at all."]
    gl_paras = ["Abra a vista de <gui>Actividades</gui> e comece a escribir.",
                "Os seus ficheiros gárdanse no computador ata que os elimine.",
                "Os seus ficheiros gárdanse no computador ata que os elimine.",
                "This paragraph is never translated by anyone at all."]
    make_deb(dl / "gnome-user-docs_43.0-2_all.deb", "gnome-user-docs", "43.0-2", {
        f"{help_root}/C/gnome-help/a.page": page(None, "Getting started with the desktop", en_paras),
        f"{help_root}/gl/gnome-help/a.page": page("gl", "Primeiros pasos co escritorio", gl_paras),
        f"{help_root}/C/gnome-help/figures/x.png": b"\x89PNG",
        # structure differs from the English page: kept as text, aligned with nothing, and
        # its English leftovers caught by the all-English filter
        f"{help_root}/C/gnome-help/b.page": page(None, "Printing a document on paper",
                                                  ["Choose Print from the application menu."]),
        f"{help_root}/gl/gnome-help/b.page": page("gl", "Imprimir un documento en papel", [
            "Escolla Imprimir no menú do aplicativo.", "Open the Activities overview and start typing."]),
    })
    for loc, ftl, props in [("en-GB", FTL_EN, PROPS_EN), ("cy", FTL_CY, PROPS_CY),
                            ("gl", FTL_GL, "")]:
        pkg = f"firefox-esr-l10n-{loc.lower()}"
        make_deb(dl / f"{pkg}_153.0esr-1_all.deb", pkg, "153.0esr-1", {
            f"usr/lib/firefox-esr/browser/extensions/langpack-{loc}@firefox-esr.mozilla.org.xpi":
                xpi(loc, ftl, props)})
    with zipfile.ZipFile(dl / f"django-{DJANGO_VERSION}-py3-none-any.whl", "w") as z:
        z.writestr("django/conf/locale/cy/LC_MESSAGES/django.po", PO_CY)
        z.writestr("django/conf/locale/en/LC_MESSAGES/django.po", PO_EN)

    def no_network(*a, **k):
        raise AssertionError(f"test tried to run {a!r}")

    # apt-get (debian.apt_download) and pip (models.fetch_wheel) both go through subprocess.run
    monkeypatch.setattr(subprocess, "run", no_network)
    return tmp_path / "corpus"
