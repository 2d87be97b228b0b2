"""What a long stage shows and measures while it runs: a tqdm bar in tokens/s, the peak memory,
wall time, and the libraries' own bars and warnings kept quiet (ours report progress).
"""
from __future__ import annotations

import math
import os
import threading
import time
from typing import Optional

import torch

__all__ = ["PeakMemory", "progress", "fmt_bytes", "now", "quiet_libraries"]


class PeakMemory:
    """Peak memory during a block: CUDA max allocated on GPU, else process RSS sampled by a
    background thread (every ``interval`` s) and at each ``sample()`` call."""

    def __init__(self, device: torch.device, interval: float = 0.01):
        self.device = device
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss"

    def _rss(self) -> int:
        import psutil

        return int(psutil.Process().memory_info().rss)

    def sample(self) -> None:
        if self.kind == "rss":
            self.peak = max(self.peak, self._rss())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "PeakMemory":
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.sample()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> int:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self.kind == "cuda_max_allocated":
            self.peak = max(self.peak, int(torch.cuda.max_memory_allocated(self.device)))
        else:
            self.sample()
        return self.peak


def progress(total: int, desc: str, unit: str = "tok", initial: int = 0, disable: bool = False):
    """A tqdm bar in tokens (tqdm shows tokens/s); hidden when stderr is not a terminal, or when
    ``disable`` (e.g. on every rank but 0 of a distributed run)."""
    from tqdm.auto import tqdm

    if disable:
        return tqdm(total=total, disable=True)
    disable = None if os.environ.get("LAPE_KERNELS_PROGRESS", "") != "1" else False
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, initial=initial, disable=disable,
                dynamic_ncols=True, leave=False)


def fmt_bytes(n: Optional[float]) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def now() -> float:
    return time.perf_counter()


def quiet_libraries() -> None:
    """Our own tqdm bars report progress; silence the libraries' per-file bars and warnings."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except Exception:  # pragma: no cover - optional nicety
        pass
    try:
        from transformers.utils import logging as tf_logging

        tf_logging.disable_progress_bar()
        tf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass
