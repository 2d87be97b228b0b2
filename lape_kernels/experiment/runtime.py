"""Where and how a stage computes: ``--device``, ``--dtype`` and ``--autocast`` parsed once (the
same words mean the same thing in collect, finetune and eval), evaluation without gradient work,
and seeding.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ..dtypes import DTYPE_NAMES, dtype_name
from .errors import ExperimentError

__all__ = ["parse_device", "parse_dtype", "parse_autocast", "autocast", "no_param_grads", "eval_loss_chunk",
           "dtype_name", "seed_everything"]

#: ``--autocast`` words: off, or a half-precision dtype by any of its names
_AUTOCAST = {"none": None, "off": None,
             **{name: dt for name, dt in DTYPE_NAMES.items() if dt != torch.float32}}


def parse_device(name: Optional[str]) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N``. Inside a
    ``torchrun`` launch, ``auto`` / ``cuda`` mean this process's GPU, ``cuda:LOCAL_RANK``."""
    from ..distributed import device_for

    name = (name or "auto").strip()
    if name == "auto":
        return device_for(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ExperimentError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ExperimentError(f"--device {name}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ExperimentError(f"--device {name}: only cpu and cuda are supported")
    return device_for(dev)


def parse_dtype(name: Optional[str], device: torch.device, auto: Optional[torch.dtype] = None) -> torch.dtype:
    """The weights' dtype. ``auto``: ``auto`` if given, else float32 on CPU and bfloat16 on CUDA.

    Training and evaluation pass ``auto=float32``: an update of 1e-5 is below half a bfloat16
    ulp of most weights, so bfloat16 weights would silently drop (or hide) it; use
    ``--autocast bf16`` for bfloat16 matmuls over float32 weights instead.
    """
    name = (name or "auto").strip()
    if name == "auto":
        if auto is not None:
            return auto
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPE_NAMES:
        raise ExperimentError(f"--dtype {name!r} is not supported (use auto, float32, bfloat16, float16)")
    return DTYPE_NAMES[name]


def parse_autocast(name: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """Mixed precision for matmuls: ``auto`` (bfloat16 on CUDA, none on CPU), ``none``, ``bf16``, ``fp16``."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name not in _AUTOCAST:
        raise ExperimentError(f"--autocast {name!r} is not supported (use auto, none, bf16, fp16)")
    return _AUTOCAST[name]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` when ``dtype`` is set, else a no-op context."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def no_param_grads(model: torch.nn.Module):
    """Parameters temporarily ``requires_grad=False``: evaluation under ``no_grad`` then skips
    gradient work that autograd Functions decide from ``requires_grad`` (the chunked loss computes
    d(lm_head) in its forward whenever the head weight requires grad, grad mode or not)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def eval_loss_chunk(model: torch.nn.Module) -> int:
    """Tokens per chunk of the chunked LM loss for evaluation: about 64M logits (256 MiB fp32),
    so a 262k-vocabulary head streams its weight a few times per batch instead of once per
    32 tokens (2x faster on a 2-core CPU); memory is not the constraint when nothing trains."""
    head = getattr(model, "lm_head", None)
    vocab = head.weight.shape[0] if head is not None else 32000
    c = max(1, (1 << 26) // vocab)
    return 1 << (c.bit_length() - 1)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
