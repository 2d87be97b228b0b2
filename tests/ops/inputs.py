"""Inputs of the op tests: gate/up in the layouts the ops accept, token languages, selections and
GEMM operands (shared by every file of tests/ops and every backend)."""
from __future__ import annotations

from typing import Optional

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("contiguous", "halves", "padded")


def randn(*shape, dtype=torch.float32, seed: int = 0, scale: float = 1.0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def gate_up(T: int, I: int, dtype=torch.float32, layout: str = "halves", seed: int = 0, scale: float = 3.0,
            device="cpu"):
    """gate, up [T, I] in a layout the ops read without copying: ``contiguous``; ``halves`` (the
    two halves of one fused [T, 2I] projection, like Phi-3's gate_up); ``padded`` (row stride > I)."""
    if layout == "halves":
        both = randn(T, 2 * I, dtype=dtype, seed=seed, scale=scale, device=device)
        return both[:, :I], both[:, I:]
    if layout == "padded":
        g = randn(T, I + 7, dtype=dtype, seed=seed, scale=scale, device=device)[:, 3 : 3 + I]
        u = randn(T, I + 5, dtype=dtype, seed=seed + 1, device=device)[:, :I]
        return g, u
    if layout != "contiguous":
        raise ValueError(f"unknown layout {layout!r}")
    return (randn(T, I, dtype=dtype, seed=seed, scale=scale, device=device),
            randn(T, I, dtype=dtype, seed=seed + 1, device=device))


def lang_ids(T: int, num_langs: int, seed: int = 0, mode: str = "runs", device="cpu") -> Optional[torch.Tensor]:
    """token_lang [T]. ``none``: None (every token is language 0). ``runs``: runs of one language
    (as batches of sequences give) with mixed stretches, padding (-1), ids >= num_langs and, for
    T > 2, the ids 2^32 + 1 and -2^32 + 1 (none of those may be counted). ``random``: every row its own id.
    ``alternating``: the language changes on every row."""
    if mode == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    if mode == "random":
        lang = torch.randint(-1, num_langs + 2, (T,), generator=g)
    elif mode == "alternating":
        lang = torch.arange(T) % (num_langs + 2) - 1
    elif mode == "runs":
        lang = torch.empty(T, dtype=torch.int64)
        pos = 0
        while pos < T:
            n = int(torch.randint(1, 20, (1,), generator=g))
            lang[pos : pos + n] = int(torch.randint(-1, num_langs + 1, (1,), generator=g))
            pos += n
        mixed = torch.rand(T, generator=g) < 0.1
        lang[mixed] = torch.randint(-1, num_langs + 1, (int(mixed.sum()),), generator=g)
        if T > 2:  # ids that an int32 truncation would wrap into [0, num_langs)
            lang[T // 2] = 2**32 + 1
            lang[T // 3] = -(2**32) + 1
    else:
        raise ValueError(f"unknown token_lang mode {mode!r}")
    return lang.to(device)


def sorted_sel(I: int, k: int, seed: int = 0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(I, generator=g)[:k].sort().values.to(device)


def dyadic(T: int, H: int, I: int, dtype, seed: int, device="cpu"):
    """x = i/8, w = j/16, |i|, |j| <= 8 (H <= 64): every product and partial sum is a multiple of
    2^-7 below 2^5, so any fp32 GEMM order is exact and the kernels' gate equals the reference's."""
    assert H <= 64
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-8, 9, (T, H), generator=g) / 8
    wg = torch.randint(-8, 9, (I, H), generator=g) / 16
    wu = torch.randint(-8, 9, (I, H), generator=g) / 16
    return tuple(t.to(dtype).to(device) for t in (x, wg, wu))


def gaussian(T: int, H: int, I: int, dtype, seed: int, device="cpu"):
    """Unit-variance x; weights scaled so that gate ~ N(0, 4) (act's interesting range)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    wg = torch.randn(I, H, generator=g) * (2.0 / max(H, 1) ** 0.5)
    wu = torch.randn(I, H, generator=g) / max(H, 1) ** 0.5
    return tuple(t.to(dtype).to(device) for t in (x, wg, wu))
