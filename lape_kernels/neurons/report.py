"""Neuron sets for people: a per-layer markdown table and a heat map."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

import torch

from .neuron_set import NeuronSet

__all__ = ["per_layer_table", "plot_heatmap"]


def per_layer_table(ns: NeuronSet) -> str:
    """Markdown table: one row per layer, one column per language, neuron counts; a total row."""
    langs = ns.languages
    counts = [ns.layer_counts(lang) for lang in langs]
    lines = ["| layer | " + " | ".join(langs) + " |", "| ---: | " + " | ".join("---:" for _ in langs) + " |"]
    for li in range(ns.num_layers):
        lines.append(f"| {li} | " + " | ".join(str(c[li]) for c in counts) + " |")
    lines.append("| total | " + " | ".join(str(sum(c)) for c in counts) + " |")
    return "\n".join(lines) + "\n"


def plot_heatmap(ns: NeuronSet, path: Union[str, Path], title: Optional[str] = None) -> Path:
    """Heat map of neurons per layer (rows) x language (columns), written to ``path``.

    Uses the Agg canvas directly, so it changes no global matplotlib backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    langs = ns.languages
    data = torch.tensor([ns.layer_counts(lang) for lang in langs], dtype=torch.int64).T.numpy()
    fig = Figure(figsize=(max(4.0, 0.6 * len(langs) + 2.0), max(3.0, 0.22 * ns.num_layers + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(langs)))
    ax.set_xticklabels(langs, rotation=45 if len(langs) > 8 else 0)
    ax.set_xlabel("language")
    ax.set_ylabel("layer")
    step = max(1, math.ceil(ns.num_layers / 16))
    ax.set_yticks(range(0, ns.num_layers, step))
    ax.set_title(title or (f"language neurons per layer{f' ({ns.model_id})' if ns.model_id else ''}"))
    fig.colorbar(im, ax=ax, label="neurons")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
