"""Fetching (apt-get download) and reading (.deb = ar + tar) Debian packages; the data room's
all-or-nothing cache writes."""

from __future__ import annotations

import json
import subprocess

import pytest
from fake_packages import make_deb

from lape_kernels.data import atomic, debian
from lape_kernels.data.errors import CorpusSourceError


def test_apt_download_errors(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package foo")

    monkeypatch.setattr(debian.shutil, "which", lambda name: "/usr/bin/apt-get")
    monkeypatch.setattr(debian.subprocess, "run", fake_run)
    monkeypatch.setattr(debian, "_is_root", lambda: False)
    with pytest.raises(CorpusSourceError, match="apt-get update"):
        debian.apt_download("foo", tmp_path)
    monkeypatch.setattr(debian, "_is_root", lambda: True)
    with pytest.raises(LookupError, match="does not exist"):
        debian.apt_download("foo", tmp_path)
    assert ["apt-get", "update"] in calls
    monkeypatch.setattr(debian.shutil, "which", lambda name: None)
    with pytest.raises(CorpusSourceError, match="apt-get not found"):
        debian.apt_download("foo", tmp_path)


def test_apt_download_keeps_the_fetched_file_and_reuses_it(tmp_path, monkeypatch):
    def fake_apt(cmd, cwd, **kw):
        assert cmd == ["apt-get", "download", "pkg"]
        make_deb(cwd / "pkg_1.2-3_all.deb", "pkg", "1.2-3", {"usr/share/x": b"x"})
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(debian.shutil, "which", lambda name: "/usr/bin/apt-get")
    monkeypatch.setattr(debian.subprocess, "run", fake_apt)
    deb = debian.apt_download("pkg", tmp_path)
    assert deb == tmp_path / "pkg_1.2-3_all.deb" and deb.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [deb.name]  # scratch directory removed
    assert debian.deb_version(deb) == "1.2-3" and debian.deb_package_name(deb) == "pkg"
    with debian.deb_tar(deb, "data") as tf:
        assert tf.extractfile("./usr/share/x").read() == b"x"
    monkeypatch.setattr(debian.subprocess, "run", lambda *a, **k: pytest.fail("no second download"))
    assert debian.apt_download("pkg", tmp_path) == deb


def test_deb_reader_rejects_non_deb(tmp_path):
    p = tmp_path / "x.deb"
    p.write_bytes(b"not an archive")
    with pytest.raises(CorpusSourceError, match="not a Debian package"):
        debian.deb_version(p)
    empty = tmp_path / "x_1_all.deb"  # an ar archive without members: the error names the file
    empty.write_bytes(b"!<arch>\n")
    with pytest.raises(CorpusSourceError, match=r"x_1_all.deb: no data.tar"):
        debian.deb_tar(empty, "data")


def test_write_json_atomic(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic.write_json_atomic(path, {"b": ["ü", 1], "a": None})
    assert json.loads(path.read_text("utf-8")) == {"b": ["ü", 1], "a": None}
    assert "ü" in path.read_text("utf-8")  # UTF-8, not \u escapes
    atomic.write_json_atomic(path, [1])
    assert json.loads(path.read_text("utf-8")) == [1]
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_atomic_dir_replaces_all_or_nothing(tmp_path):
    final = tmp_path / "d"
    with atomic.atomic_dir(final) as scratch:
        scratch.mkdir()
        (scratch / "x").write_text("1")
    assert (final / "x").read_text() == "1"
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic.atomic_dir(final) as scratch:
            scratch.mkdir()
            (scratch / "x").write_text("2")
            raise RuntimeError("interrupted")
    assert (final / "x").read_text() == "1"  # the old directory is untouched
    with atomic.atomic_dir(final) as scratch:
        scratch.mkdir()
        (scratch / "y").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["y"]  # replaced, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no scratch directory left
