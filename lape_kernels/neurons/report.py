"""Neuron sets for people: a per-layer markdown table, a per-layer heat map, and for sets with
expert neurons a per-(MoE layer, expert) heat map per language."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .neuron_set import NeuronSet

__all__ = ["per_layer_table", "plot_heatmap", "plot_expert_heatmap"]


def per_layer_table(ns: NeuronSet) -> str:
    """Markdown table: one row per layer, one column per language, neuron counts; a total row.
    A set with expert neurons adds a row per MoE layer (``<layer> experts``: summed over its
    experts) after the dense layers (``<layer> mlp``); the total counts both."""
    langs = ns.languages
    counts = [ns.layer_counts(lang) for lang in langs]
    lines = ["| layer | " + " | ".join(langs) + " |", "| ---: | " + " | ".join("---:" for _ in langs) + " |"]
    mlp = " mlp" if ns.has_experts else ""
    for li in range(ns.num_layers):
        lines.append(f"| {li}{mlp} | " + " | ".join(str(c[li]) for c in counts) + " |")
    if ns.has_experts:
        per_moe = [ns.expert_counts(lang).sum(dim=1).tolist() for lang in langs]
        for m, li in enumerate(ns.expert_layers):
            lines.append(f"| {li} experts | " + " | ".join(str(c[m]) for c in per_moe) + " |")
    lines.append("| total | " + " | ".join(str(ns.total(lang)) for lang in langs) + " |")
    return "\n".join(lines) + "\n"


def plot_heatmap(ns: NeuronSet, path: Union[str, Path], title: Optional[str] = None) -> Path:
    """Heat map of neurons per layer (rows) x language (columns), written to ``path``.

    Uses the Agg canvas directly, so it changes no global matplotlib backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if ns.num_layers == 0:
        raise ValueError("plot_heatmap: this neuron set has no dense MLP layers (a mixture-of-experts model's): "
                         "use plot_expert_heatmap")
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
    return _save(fig, path, 120)


def _save(fig, path: Union[str, Path], dpi: int) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def plot_expert_heatmap(ns: NeuronSet, path: Union[str, Path], languages: Optional[Sequence[str]] = None,
                        title: Optional[str] = None, dpi: int = 100) -> Path:
    """Heat map of each language's expert neurons: MoE layers (rows) x experts (columns), one
    panel per language (default: all, in set order) on one colour scale, written to ``path``.
    An error for a set without expert neurons. Agg canvas only (no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not ns.has_experts:
        raise ValueError("plot_expert_heatmap: this neuron set has no expert neurons (a dense model's): use plot_heatmap")
    langs = list(ns.languages if languages is None else ([languages] if isinstance(languages, str) else languages))
    if not langs:
        raise ValueError("plot_expert_heatmap: no language to plot")
    data = [ns.expert_counts(lang).numpy() for lang in langs]  # KeyError naming the set's languages
    vmax = max(1, max(int(d.max()) for d in data))
    import numpy as np

    layers, E = ns.expert_layers, ns.expert_layout.num_experts
    cols = min(len(langs), 4)
    rows = math.ceil(len(langs) / cols)
    fig = Figure(figsize=(cols * max(2.4, 0.3 * E + 1.2) + 1.2, rows * max(2.0, 0.25 * len(layers) + 1.2) + 0.8),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(len(langs))]
    for ax, lang, d in zip(axes, langs, data):
        im = ax.imshow(d, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=vmax)
        ax.set_title(f"{lang} ({int(d.sum())})", fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        xstep, ystep = max(1, math.ceil(E / 16)), max(1, math.ceil(len(layers) / 16))
        ax.set_xticks(range(0, E, xstep))
        ax.set_yticks(range(0, len(layers), ystep))
        ax.set_yticklabels([str(layers[i]) for i in range(0, len(layers), ystep)])
        ax.tick_params(labelsize=7)
        if d.size <= 64:  # small grids: the counts in the cells
            for (r, c), v in np.ndenumerate(d):
                ax.text(c, r, str(int(v)), ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 * vmax else "black")
    fig.colorbar(im, ax=axes, label="neurons", shrink=0.9)
    fig.suptitle(title or f"language neurons per expert{f' ({ns.model_id})' if ns.model_id else ''}", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
