"""Debian packages: fetched with ``apt-get download`` (no root, no install) and read straight
from the archive (.deb = ar archive of control.tar.* and data.tar.*), with no dpkg.

Why not dpkg/apt install: the corpus only needs a few files out of each package, and a
download works as any user on any Debian/Ubuntu machine.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from .errors import CorpusSourceError

__all__ = ["apt_download", "deb_package_name", "deb_tar", "deb_version"]


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


def deb_tar(deb: Path, prefix: str) -> tarfile.TarFile:
    """The `prefix` ('control' or 'data') tar archive inside a .deb, opened for reading."""
    members = _ar_members(deb.read_bytes())
    for name, blob in members.items():
        if name.startswith(prefix + ".tar"):
            if name.endswith(".zst"):
                raise CorpusSourceError(f"{deb.name}: zstd-compressed {name} is not supported")
            return tarfile.open(fileobj=io.BytesIO(blob), mode="r:*")
    raise CorpusSourceError(f"{deb.name}: no {prefix}.tar.* member")


def deb_version(deb: Path) -> str:
    """The Version field of the package's control file."""
    with deb_tar(deb, "control") as tf:
        for m in tf.getmembers():
            if m.name.lstrip("./") == "control":
                for line in tf.extractfile(m).read().decode().splitlines():
                    if line.startswith("Version:"):
                        return line.split(":", 1)[1].strip()
    raise CorpusSourceError(f"{deb.name}: no Version in control")


def deb_package_name(deb: Path) -> str:
    """The package name a .deb file is named after (``name_version_arch.deb``)."""
    return deb.name.split("_")[0]
