"""How every experiment command fails: one line on stderr, a non-zero exit, no traceback.

Why one owner: ``lape-kernels <cmd>`` and the demo's per-method training process must word and
exit the same way (``Interrupted`` exits 3 so a wrapper can tell "stopped, resumable" apart).
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator, Type

__all__ = ["ExperimentError", "Interrupted", "one_line", "reworded", "run_reporting"]


class ExperimentError(Exception):
    """A failure the user can act on; the CLI prints it as one line and exits non-zero."""


class Interrupted(ExperimentError):
    """A run stopped on purpose (``--stop-after-steps``) after saving a resumable checkpoint."""

    exit_code = 3


def one_line(exc: BaseException) -> str:
    """``exc`` as a single line (messages of library errors sometimes span several)."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]  # KeyError's str() adds quotes
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    from ..files import OutputError  # its message is already for the user: path, cause, way out

    if not isinstance(exc, (ExperimentError, OutputError)):
        text = f"{type(exc).__name__}: {text}"
    return text


@contextlib.contextmanager
def reworded(prefix: str, *kinds: Type[BaseException]) -> Iterator[None]:
    """Errors of ``kinds`` raised in the block become ``ExperimentError("<prefix>: <one line>")``
    (the library's message, said once, with what the user gave); ``ExperimentError`` passes."""
    try:
        yield
    except ExperimentError:
        raise
    except kinds as exc:
        raise ExperimentError(f"{prefix}: {one_line(exc)}") from None


def run_reporting(prog: str, work: Callable[[], int]) -> int:
    """``work()``'s exit code; any failure becomes ``"<prog>: error: <one line>"`` on stderr and
    exit 1 (3 for ``Interrupted``, 130 for Ctrl-C). ``LAPE_KERNELS_DEBUG=1``: the traceback."""
    from .progress import quiet_libraries

    try:
        if not os.environ.get("LAPE_KERNELS_DEBUG"):
            quiet_libraries()
        return work()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (a rerun of the same command resumes where a checkpoint exists)", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except BaseException as exc:  # one line, no traceback: the contract of every subcommand
        if os.environ.get("LAPE_KERNELS_DEBUG"):
            raise
        code = exc.exit_code if isinstance(exc, Interrupted) else 1
        sys.stderr.write(f"{prog}: error: {one_line(exc)}\n")  # one write: lines of processes never interleave
        sys.stderr.flush()
        return code
