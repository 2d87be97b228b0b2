"""Files: reading the library's safetensors files with errors that name the file and the cause;
guarding the outputs commands write (never over an input or what the user owns, one process at a
time); digests of the inputs' content.

Why one owner: statistics, neuron sets, saved neurons and checkpoints are all safetensors files;
safetensors' own errors ("Error while deserializing header: HeaderTooLarge") name neither the
file nor what it means, and every reader would otherwise word its own variant.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, Optional, Sequence, Type, Union

import torch

__all__ = ["write_atomic", "publish", "atomic_dir", "remove_path", "open_safetensors", "load_safetensors", "not_safetensors_message", "OutputError", "lock_path",
           "output_lock", "check_output", "claim_output", "text_digest", "tensors_digest"]

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------
# all-or-nothing writes (the one implementation: caches, statistics, runs, reports)
# Why: commands are interrupted (Ctrl-C, kill -9, out of memory); a reader must find either the
# previous file or directory or the complete new one, never half of one.
# --------------------------------------------------------------------------------------------

def write_atomic(path: PathLike, data: Union[str, bytes]) -> Path:
    """Write ``data`` (str as UTF-8, or bytes) to ``path`` through a hidden temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def remove_path(path: PathLike) -> None:
    """Delete a file, link or directory tree (only ever what a command itself wrote)."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def publish(tmp: PathLike, final: PathLike) -> None:
    """Rename the finished ``tmp`` onto ``final``; an old ``final`` is moved aside first and removed
    only once the new one is in place."""
    tmp, final = Path(tmp), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() or final.is_symlink():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        remove_path(old)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_dir(final: PathLike) -> Iterator[Path]:
    """A scratch path beside ``final`` to write a directory into; when the block ends without an
    error the scratch directory is published onto ``final``; on an error it is removed."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, final)


def not_safetensors_message(path: PathLike, exc: BaseException) -> str:
    """``"<path>: not a valid safetensors file: <cause>"`` (one line)."""
    cause = " ".join(str(exc).split()) or type(exc).__name__
    return f"{os.fspath(path)}: not a valid safetensors file: {cause} (truncated, overwritten or not written by safetensors)"


@contextlib.contextmanager
def open_safetensors(path: PathLike, error: Type[Exception] = ValueError) -> Iterator[object]:
    """``safetensors.safe_open(path)`` (PyTorch tensors on the CPU); a malformed header, metadata
    or tensor read inside the block raises ``error`` naming ``path`` and the cause. Other errors
    raised in the block pass through unchanged."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as handle:
            yield handle
    except SafetensorError as exc:
        raise error(not_safetensors_message(path, exc)) from None


def load_safetensors(path: PathLike, error: Type[Exception] = ValueError) -> Dict[str, torch.Tensor]:
    """Every tensor of the safetensors file at ``path`` (see :func:`open_safetensors`)."""
    with open_safetensors(path, error) as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


# ----------------------------------------------------------------------------- outputs
# Why one owner: every command that writes (collect, identify, finetune, eval) must refuse the
# same things in the same words before it loads anything: replacing what the user owns, writing
# into (or over) its own input, and two processes building one output at once.

LOCK_SUFFIX = ".lock"


class OutputError(Exception):
    """An output that may not be written now; the message is one line naming the path, the
    cause and the way out (``--overwrite``, another output, wait for the other process)."""


def lock_path(path: PathLike) -> Path:
    """The lock file of an output: a hidden sibling (``.<name>.lock``), present while a process
    writes the output."""
    path = Path(path)
    return path.parent / f".{path.name}{LOCK_SUFFIX}"


def _holder(fd: int) -> str:
    """Who holds a lock, from the JSON its holder wrote into the lock file."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "another process (starting: it has not written its pid yet)"
    since = time.strftime("%H:%M:%S UTC", time.gmtime(info.get("started", 0)))
    what = f", {info['command']}" if info.get("command") else ""
    return f"another process (pid {info['pid']} on host {info.get('host', '?')}{what}, since {since})"


@contextlib.contextmanager
def output_lock(path: PathLike, command: str = "") -> Iterator[Path]:
    """Hold the lock of output ``path`` for the block (``flock`` on :func:`lock_path`, released by
    the kernel if the process dies, so no lock outlives its process); raise :class:`OutputError`
    naming the holder's pid and host when another process holds it. Also the writability probe
    of the output's folder: a folder where the lock cannot be created cannot take the output."""
    path = Path(path)
    lock = lock_path(path)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create its folder {lock.parent}: {exc.strerror or exc}") from None
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write in {lock.parent}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder(fd)
            os.close(fd)
            raise OutputError(f"{path} is being written by {who}: wait for it to finish, or choose another "
                              f"output (lock file {lock})") from None
        try:  # the previous holder may have removed the file between our open and our lock
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    try:
        yield lock
    finally:
        try:
            os.unlink(lock)  # while still holding it: a waiting opener then sees another inode and retries
        finally:
            os.close(fd)


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(path: PathLike, inputs: Iterable[Optional[PathLike]] = (), *, is_dir: bool,
                 flag: str = "-o") -> Path:
    """Refuse an output that is, is inside, or contains one of ``inputs`` (the command would
    write into or delete what it reads, ``--overwrite`` or not), and an output of the wrong kind
    (a directory where a file is written, or the reverse). Inputs that are not local paths
    (model aliases, hub ids) are skipped. Returns ``path`` as a Path."""
    path = Path(path)
    real = path.expanduser().resolve()
    for given in inputs:
        if given is None or not Path(given).expanduser().exists():
            continue
        src = Path(given).expanduser().resolve()
        if real == src:
            raise OutputError(f"{flag} {path} is the input {given}: choose another output (the input would be "
                              f"replaced while it is read)")
        if _within(real, src):
            raise OutputError(f"{flag} {path} is inside the input {given}: choose an output outside it")
        if _within(src, real):
            raise OutputError(f"{flag} {path} contains the input {given}: choose another output (replacing it "
                              f"would delete the input)")
    if path.exists() and not is_dir and path.is_dir() and not path.is_symlink():
        raise OutputError(f"{flag} {path} is a directory; this command writes a file: give a file path")
    if path.exists() and is_dir and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file; this command writes a directory: give another path")
    for parent in path.expanduser().absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{flag} {path}: {parent} is a file, not a folder")
            break
    return path


@contextlib.contextmanager
def claim_output(path: PathLike, *, inputs: Iterable[Optional[PathLike]] = (), overwrite: bool = False,
                 is_dir: bool = True, reusable: Optional[Callable[[Path], Optional[str]]] = None,
                 also: Sequence[PathLike] = (), command: str = "", flag: str = "-o") -> Iterator[Path]:
    """The one guard of every command's output, held for the whole command: :func:`check_output`,
    then :func:`output_lock`, then (under the lock) an existing output is refused unless
    ``overwrite`` or ``reusable(path)`` returns None (the command's own output with the same
    settings, which it may reuse or recompute); otherwise ``reusable``'s string says what the
    existing output is. ``also``: further paths the command writes (checked the same way)."""
    path = check_output(path, inputs, is_dir=is_dir, flag=flag)
    inputs = list(inputs)
    for extra in also:
        check_output(extra, inputs, is_dir=is_dir, flag=flag)
    with output_lock(path, command):
        for target in (path, *map(Path, also)):
            if overwrite or not (target.exists() or target.is_symlink()):
                continue
            reason = reusable(target) if reusable is not None else ""
            if reason is not None:
                why = f" ({reason})" if reason else ""
                raise OutputError(f"{target} exists{why}; pass --overwrite to replace it")
        yield path


# ----------------------------------------------------------------------------- content digests
def text_digest(texts: Iterable[str]) -> str:
    """A digest of a sequence of texts (their content and their order, not where they were read
    from): resume and "already complete" decisions compare it, so an edited corpus is seen."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:32]


def tensors_digest(tensors: Iterable[torch.Tensor]) -> str:
    """A digest of tensors' dtypes, shapes and values (e.g. a neuron set's per-layer indices)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}:{list(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:32]
