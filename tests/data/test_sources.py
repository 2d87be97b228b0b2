"""The text-source registry and the sources themselves on synthetic packages."""

from __future__ import annotations

import pytest

from lape_kernels.data import available_languages
from lape_kernels.data.sources import (
    DEFAULT_SOURCES,
    DJANGO_VERSION,
    SOURCES,
    DjangoSource,
    FirefoxSource,
    GnomeHelpSource,
    TextSource,
    canonical_lang,
    check_sources,
    get_source,
)


def test_registry_holds_one_instance_per_source_class():
    assert DEFAULT_SOURCES == ("gnome-help", "firefox", "django")
    assert list(SOURCES) == list(DEFAULT_SOURCES)
    assert [type(s) for s in SOURCES.values()] == [GnomeHelpSource, FirefoxSource, DjangoSource]
    for name, source in SOURCES.items():
        assert isinstance(source, TextSource) and source.name == name
        assert get_source(name) is source
        assert source.origin in ("debian", "pypi") and source.license and source.homepage
        assert "en" in source.languages
        assert all(canonical_lang(lang) == lang for lang in source.languages)
        assert len(set(source.languages)) == len(source.languages)


@pytest.mark.parametrize("name", ["wikipedia", "Firefox", "", "gnome_help"])
def test_unknown_source_is_a_clear_error_naming_the_choices(name):
    with pytest.raises(ValueError, match=r"unknown text source .*'gnome-help', 'firefox', 'django'"):
        get_source(name)


def test_check_sources():
    assert check_sources(None) == tuple(SOURCES.values())
    assert check_sources("django") == (SOURCES["django"],)
    assert check_sources(["firefox", "gnome-help"]) == (SOURCES["firefox"], SOURCES["gnome-help"])
    for bad in ([], ["firefox", "wikipedia"], "wikipedia"):
        with pytest.raises(ValueError, match=r"sources must be a non-empty subset of "
                                             r"\['django', 'firefox', 'gnome-help'\]"):
            check_sources(bad)


def test_available_languages_is_the_union_of_the_sources():
    assert available_languages("django") == sorted(SOURCES["django"].languages)
    union = sorted({lang for s in SOURCES.values() for lang in s.languages})
    assert available_languages() == union
    assert {"en", "cy", "ga", "ne", "sr_Latn", "pt_BR", "zh_CN"} <= set(union)
    with pytest.raises(ValueError, match="sources"):
        available_languages(["nope"])


def test_firefox_package_names():
    ff = SOURCES["firefox"]
    assert ff.package_for("en") == "firefox-esr-l10n-en-gb"
    assert ff.package_for("ga") == "firefox-esr-l10n-ga-ie"
    assert ff.package_for("pt_BR") == "firefox-esr-l10n-pt-br"
    assert ff.package_for("cy") == "firefox-esr-l10n-cy"
    with pytest.raises(KeyError):
        ff.package_for("xx")


def test_only_gnome_help_has_unaligned_segments():
    assert not SOURCES["gnome-help"].aligned("gnome-help/b.page#u1")
    assert SOURCES["gnome-help"].aligned("gnome-help/a.page#1")
    assert SOURCES["firefox"].aligned("browser/x.ftl:msg#u1")


def test_sources_read_synthetic_packages(fake_cache):
    downloads = fake_cache / "downloads"
    gnome = SOURCES["gnome-help"]
    packages = gnome.fetch(["en", "gl"], downloads)
    assert {p.name for p in packages.values()} == {"gnome-user-docs"}
    segs = gnome.read(packages, ["en", "gl"])
    assert segs["gl"]["gnome-help/a.page#1"] == (
        "Abra a vista de Actividades e comece a escribir.",
        "Open the Activities overview and start typing.")
    assert segs["gl"]["gnome-help/b.page#u0"] == ("Imprimir un documento en papel", None)
    assert segs["en"]["gnome-help/a.page#0"] == ("Getting started with the desktop",) * 2

    firefox = SOURCES["firefox"]
    packages = firefox.fetch(["cy", "en"], downloads)
    assert packages["cy"].name == "firefox-esr-l10n-cy" and packages["cy"].version == "153.0esr-1"
    assert packages["cy"].english.name == "firefox-esr-l10n-en-gb"
    segs = firefox.read(packages, ["cy", "en"])
    uid = "browser/localization/{loc}/browser/test.ftl:label"
    assert segs["cy"][uid] == ("Gosodiadau", "Settings")
    assert segs["en"][uid] == ("Settings", "Settings")
    assert not any(u.endswith(":count") for u in segs["cy"])  # needs $n: left out
    assert firefox.provenance(packages["cy"])["english_reference"] == {
        "package": "firefox-esr-l10n-en-gb", "version": "153.0esr-1"}

    django = SOURCES["django"]
    packages = django.fetch(["cy", "en"], downloads)
    assert packages["cy"].version == DJANGO_VERSION
    segs = django.read(packages, ["cy", "en"])
    uid = "django/conf/locale/{loc}/LC_MESSAGES/django.po||Enter a valid email address, please."
    assert segs["cy"] == {uid: ("Rhowch gyfeiriad e-bost dilys, os gwelwch yn dda.",
                                "Enter a valid email address, please.")}
    assert segs["en"][uid] == ("Enter a valid email address, please.",) * 2


def test_firefox_skips_a_language_pack_gone_from_the_archive(fake_cache, monkeypatch):
    from lape_kernels.data.sources import firefox

    def apt_download(package, dest):
        if package == "firefox-esr-l10n-gl":
            raise LookupError(f"Debian package {package!r} does not exist")
        return sorted(dest.glob(f"{package}_*.deb"))[-1]

    monkeypatch.setattr(firefox, "apt_download", apt_download)
    with pytest.warns(UserWarning, match="language 'gl' skipped"):
        packages = SOURCES["firefox"].fetch(["cy", "gl"], fake_cache / "downloads")
    assert list(packages) == ["cy"]
