"""The LAPE reference format of neuron sets (``torch.save`` of ``list[language][layer]`` int64
tensors, as RUCAIBox/Language-Specific-Neurons writes it): read safely, and the format error."""
from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..languages import check_languages

__all__ = ["NeuronSetFormatError", "read_reference"]


class NeuronSetFormatError(ValueError):
    """A neuron-set file that is not in a format we read (or is malformed)."""


def read_reference(path: Path, languages: Optional[Sequence[str]]) -> Tuple[Dict[str, Sequence[Any]], int, List[str]]:
    """(per-language per-layer tensors, layers, notes) of a LAPE reference file (``torch.save`` of
    ``list[lang][layer]``), read with ``weights_only=True``; languages named by ``languages`` in
    file order (default ``lang0``, ...; more names than entries: trailing empty sets)."""
    not_reference = (f"{path}: not a torch file (torch.save) / not a LAPE reference file (torch.save of "
                     "list[lang][layer] tensors) nor a lape_kernels neuron set")
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
    except OSError as exc:
        raise NeuronSetFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    # torch.save writes a zip archive (a pickle inside); older torch a bare pickle (first byte 0x80)
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):
        raise NeuronSetFormatError(f"{not_reference}: neither a zip archive nor a pickle "
                                   f"(starts with bytes {head.hex() or 'nothing: empty file'})")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says it all
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's first line suggests weights_only=False; keep only its reason
        detail = [ln.strip() for ln in str(exc).splitlines()[1:]
                  if ln.strip() and not ln.startswith("Check the documentation") and "file an issue" not in ln]
        raise NeuronSetFormatError(
            f"{path}: refused to load: not a plain list of tensors (torch.load weights_only=True "
            f"rejected it; arbitrary pickled objects are never loaded)"
            + (f": {detail[0]}" if detail else "")) from None
    except Exception as exc:  # a zip archive or pickle that is no torch file
        raise NeuronSetFormatError(f"{not_reference}: {type(exc).__name__}: {' '.join(str(exc).split())}") from None
    if not isinstance(data, (list, tuple)) or not data:
        raise NeuronSetFormatError(f"{path}: expected a non-empty list with one entry per language "
                                   f"(each a list of per-layer int64 tensors), got {type(data).__name__}"
                                   + (" (empty)" if isinstance(data, (list, tuple)) else ""))
    for k, entry in enumerate(data):
        if not isinstance(entry, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in entry):
            raise NeuronSetFormatError(
                f"{path}: entry {k} must be a list of per-layer tensors, got "
                f"{type(entry).__name__}" + ("" if not isinstance(entry, (list, tuple))
                                              else f" containing {sorted({type(t).__name__ for t in entry})}"))
    layer_counts = {len(entry) for entry in data}
    if len(layer_counts) != 1 or 0 in layer_counts:
        raise NeuronSetFormatError(f"{path}: languages have different numbers of layers: {[len(e) for e in data]}")
    num_layers = layer_counts.pop()
    notes = []
    if languages is None:
        languages = [f"lang{k}" for k in range(len(data))]
    else:
        languages = list(languages)
        if len(languages) < len(data):
            raise ValueError(f"{path}: file has {len(data)} languages, but {len(languages)} names were given")
        if len(languages) > len(data):
            notes.append(f"languages {languages[len(data):]} absent from the reference file "
                         f"(the reference drops trailing languages with no neurons): empty sets")
        check_languages(languages)
    sets: Dict[str, Sequence[Any]] = {}
    for k, lang in enumerate(languages):
        sets[lang] = list(data[k]) if k < len(data) else [torch.empty(0, dtype=torch.int64)] * num_layers
    return sets, num_layers, notes
