"""All-or-nothing writes into the data caches (the one implementation the data room uses).

Why: builds are interrupted (Ctrl-C, out of memory, a second process); a reader must find
either the previous file or directory or the complete new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_dir", "write_json_atomic"]


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write `obj` as UTF-8 JSON (sorted keys) to `path` via a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """A scratch path beside `final` to write a directory into; when the block ends without an
    error the scratch directory replaces `final` (and whatever was there) in one rename."""
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
