"""What the experiment commands never do, decided in one place: reuse a result whose inputs changed
since it was made, apply one model's results to another, or leave a damaged resume state with
a message that names neither the file nor the way out.

Why content, not paths: a corpus is edited in place, a model directory is replaced by another
checkpoint, a neuron file is regenerated; the path stays the same and the result would silently
be stale. So every output records the digests of what it read (``inputs``: the model's
fingerprint, a digest per text read, the neuron set trained) and every "already complete" or
resume decision compares them. The output guard itself (never over an input or what the user
owns, one process per output) is ``lape_kernels.files.claim_output``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..files import text_digest
from ..fingerprint import ModelMismatchError, check_model, model_fingerprint
from .errors import ExperimentError

__all__ = ["ALLOW_OTHER_MODEL", "warn", "input_record", "changed_inputs", "reuse_complete", "check_partial_inputs",
           "damaged", "read_log", "check_same_model"]

#: the command-line way out of a model mismatch (a deliberate transfer)
ALLOW_OTHER_MODEL = "--allow-other-model"


def warn(message: str, quiet: bool = False) -> None:
    """One line on stderr: something the user should know that is not a failure."""
    if not quiet:
        print(f"lape-kernels: warning: {message}", file=sys.stderr, flush=True)


def input_record(model: Any, texts: Mapping[str, Sequence[str]], *, neurons: Optional[str] = None,
                 sources: Optional[Mapping[str, Optional[str]]] = None) -> Dict[str, Any]:
    """What a result was computed from, by content: the model's fingerprint, a digest of each
    text read (keyed by language or split), the digest of the neuron set trained; ``sources``:
    the paths given (to tell "the same command on edited inputs" from "another command")."""
    return {"model_fingerprint": model_fingerprint(model), "text": {k: text_digest(v) for k, v in texts.items()},
            "neurons": neurons, "sources": {k: (str(v) if v is not None else None) for k, v in (sources or {}).items()}}


def changed_inputs(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    """What differs between two input records, in words (empty: the same inputs)."""
    words = []
    if old.get("model_fingerprint") != new.get("model_fingerprint"):
        words.append(f"the model (fingerprint {old.get('model_fingerprint')} -> {new.get('model_fingerprint')})")
    old_text, new_text = old.get("text") or {}, new.get("text") or {}
    words += [f"the text of {k!r}" for k in sorted(set(old_text) | set(new_text)) if old_text.get(k) != new_text.get(k)]
    if old.get("neurons") != new.get("neurons"):
        words.append("the neuron set")
    return words


def reuse_complete(out: Path, recorded: Optional[Mapping[str, Any]], current: Mapping[str, Any], *,
                   quiet: bool = False) -> bool:
    """For a finished output of the same settings: True when it was computed from these very
    inputs (nothing to do); False when the same command's inputs changed since (recompute it);
    an error when it was made from other inputs given at other paths (another command's result,
    replaced only with ``--overwrite``)."""
    diffs = changed_inputs(recorded, current) if recorded is not None else ["its inputs (not recorded)"]
    if not diffs:
        if not quiet:
            print(f"{out}: already complete (same settings, same inputs); nothing to do", file=sys.stderr)
        return True
    if recorded is not None and recorded.get("sources") != current.get("sources"):
        raise ExperimentError(f"{out} exists (made from other inputs: {', '.join(diffs)}); pass --overwrite to "
                              f"replace it")
    if not quiet:
        print(f"{out}: {', '.join(diffs)} changed since it was made; recomputing", file=sys.stderr)
    return False


def check_partial_inputs(partial: Path, recorded: Optional[Mapping[str, Any]], current: Mapping[str, Any],
                         what: str) -> None:
    """An interrupted ``what`` resumes only on the inputs it started with."""
    diffs = changed_inputs(recorded, current) if recorded is not None else ["its inputs (not recorded)"]
    if diffs:
        raise ExperimentError(f"{partial} holds an interrupted {what} of other inputs ({', '.join(diffs)} changed "
                              f"since); pass --overwrite to start over, or delete {partial}")


def damaged(exc: BaseException, partial: Path) -> ExperimentError:
    """A file of a resume state that cannot be read: its message (naming the file and the cause)
    with the way out."""
    cause = " ".join(str(exc).split()) or type(exc).__name__
    return ExperimentError(f"{cause}; pass --overwrite to start over, or delete {partial}")


def read_log(path: Path, upto: int, partial: Path) -> List[str]:
    """The lines of a run's ``log.jsonl`` up to step ``upto`` (the checkpoint's). A last line
    torn by an interruption is dropped (its step comes after the checkpoint and is redone); any
    other unreadable line, or a log that ends before the checkpoint, is an error naming the file."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    kept, last_step = [], None
    for number, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (ValueError, KeyError, TypeError) as exc:
            if number == len(lines):
                break  # torn while it was being written
            raise damaged(ValueError(f"{path}: line {number} is not a log record ({type(exc).__name__}: {exc})"),
                          partial) from None
        last_step = step
        if step <= upto:
            kept.append(line)
    if upto > 0 and (last_step is None or last_step < upto):
        raise damaged(ValueError(f"{path}: ends at step {last_step}, before the checkpoint's step {upto}"), partial)
    return kept


def check_same_model(recorded: Optional[str], recorded_name: Optional[str], model: Any, what: str, *,
                     allow_other_model: bool = False) -> Optional[str]:
    """``lape_kernels.fingerprint.check_model`` with the command line's way out; returns its note."""
    try:
        return check_model(recorded, recorded_name, model, what, allow_other_model=allow_other_model,
                           way_out=f"pass {ALLOW_OTHER_MODEL}")
    except ModelMismatchError as exc:
        raise ExperimentError(str(exc)) from None
