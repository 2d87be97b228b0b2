"""Reading the library's safetensors files with errors that name the file and the cause.

Why one owner: statistics, neuron sets, saved neurons and checkpoints are all safetensors files;
safetensors' own errors ("Error while deserializing header: HeaderTooLarge") name neither the
file nor what it means, and every reader would otherwise word its own variant.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, Type, Union

import torch

__all__ = ["open_safetensors", "load_safetensors", "not_safetensors_message"]

PathLike = Union[str, os.PathLike]


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
