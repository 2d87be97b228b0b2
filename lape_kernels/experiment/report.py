"""The experiment's report: markdown tables, the two claims (computed from the figures, never
asserted), and PNG plots (matplotlib's Agg canvas, no global backend change)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .outputs import write_atomic
from .progress import fmt_bytes

__all__ = ["claims", "render_markdown", "write_report", "PLOTS", "EXPERT_PLOT"]

PLOTS = {
    "ppl": "ppl_before_after.png",
    "neurons": "neurons_per_layer.png",
    "curves": "training_curves.png",
    "alignment": "alignment.png",
    "norms": "update_norms.png",
}

#: a mixture-of-experts model's expert neurons (MoE layer x expert, per language), beside PLOTS
EXPERT_PLOT = "neurons_per_expert.png"

METHOD_ORDER = ("neurons", "random", "lora", "ffn", "full")
_COLORS = {"neurons": "#1b9e77", "random": "#d95f02", "lora": "#7570b3", "ffn": "#e7298a", "full": "#66a61e",
           "before": "#999999"}


def _pct(x: Optional[float], digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:+.{digits}f}%"


def _num(x: Optional[float], digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _methods(evals: Mapping[str, Any]) -> List[str]:
    return [m for m in METHOD_ORDER if m in evals] + [m for m in evals if m not in METHOD_ORDER]


def claims(evals: Mapping[str, Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """The issue's two claims, each with ``holds`` (True / False / None when not measured) and
    the figures it was decided on.

    1. ``neurons`` lowers the target's perplexity more than ``random`` of the same size:
       ``target_ppl_change(neurons) < target_ppl_change(random)``.
    2. ``neurons`` changes the other languages' perplexity less than ``full``: mean over the other
       languages of ``|ppl_after / ppl_before - 1|`` is smaller for ``neurons``.
    """
    n = evals.get("neurons")
    out = []
    for claim, rival, key, describe in _CLAIMS:
        r = evals.get(rival)
        if n is None or r is None or n.get(key) is None:
            out.append({"claim": claim, "holds": None, "text": f"not measured (needs the neurons and {rival} runs)"})
            continue
        a, b = n[key], r[key]
        out.append({"claim": claim, "holds": bool(a < b), "neurons": a, rival: b, "text": describe(n, r, a, b)})
    return out


def _target_text(n: Mapping[str, Any], r: Mapping[str, Any], a: float, b: float) -> str:
    t = n["settings"]["target"]
    return (f"target {t} perplexity change: neurons {_pct(a)} ({_num(n['before']['ppl'][t])} -> "
            f"{_num(n['after']['ppl'][t])}) vs random {_pct(b)} ({_num(r['after']['ppl'][r['settings']['target']])}); "
            f"random set size {r['run'].get('neuron_count')} = neurons {n['run'].get('neuron_count')}")


def _others_text(n: Mapping[str, Any], f: Mapping[str, Any], a: float, b: float) -> str:
    others = [l for l in n["settings"]["languages"] if l != n["settings"]["target"]]
    return (f"mean |perplexity change| over {len(others)} other languages: neurons {100 * a:.3f}% "
            f"vs full {100 * b:.3f}% (signed means: neurons {_pct(n['other_ppl_change_mean'])}, "
            f"full {_pct(f['other_ppl_change_mean'])})")


#: (claim, the method neurons is compared with, the figure compared (smaller holds), its text)
_CLAIMS = (
    ("neurons lowers the target language's perplexity more than random neurons of the same size", "random",
     "target_ppl_change", _target_text),
    ("neurons changes the other languages' perplexity less than full fine-tuning", "full",
     "other_ppl_abs_change_mean", _others_text),
)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Optional[str] = None) -> str:
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(map(str, header)) + " |", "| " + " | ".join(sep) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(map(str, r)) + " |")
    return "\n".join(lines) + "\n"


def render_markdown(*, setup: Mapping[str, Any], evals: Mapping[str, Mapping[str, Any]],
                    runs: Mapping[str, Mapping[str, Any]], neuron_table: Optional[str],
                    timings: Optional[Mapping[str, Any]] = None, plots: Sequence[str] = ()) -> str:
    methods = _methods(evals)
    any_eval = next(iter(evals.values())) if evals else None
    target = setup.get("target")
    lines: List[str] = []
    lines.append(f"# Sparse language-neuron fine-tuning: {setup.get('model')} -> {target}\n")
    lines.append("Produced by `lape-kernels demo` (every figure below is measured by this run).\n")
    lines.append("## Setup\n")
    lines.append(_table(["setting", "value"], [[k, v] for k, v in setup.items()], "ll"))

    lines.append("## Claims\n")
    for c in claims(evals):
        verdict = {True: "**true**", False: "**false**", None: "not measured"}[c["holds"]]
        lines.append(f"- {c['claim']}: {verdict}. {c['text']}.")
    lines.append("")

    if any_eval is not None:
        lines.append(f"## Target language ({target}) validation perplexity\n")
        rows = []
        for m in methods:
            e, r = evals[m], runs.get(m, {})
            rows.append([m, f"{r.get('trainable_params', e['run'].get('trainable_params')):,}",
                         f"{100 * e['run']['trainable_fraction']:.3f}%",
                         _num(e["before"]["ppl"][target]), _num(e["after"]["ppl"][target]), _pct(e["target_ppl_change"])])
        lines.append(_table(["method", "trainable params", "% of model", "PPL before", "PPL after", "change"], rows))

        langs = [l for l in any_eval["settings"]["languages"] if l != target]
        lines.append("## Other languages: perplexity change (preservation)\n")
        rows = []
        for m in methods:
            e = evals[m]
            rows.append([m] + [_pct(e["ppl_change"][l]) for l in langs]
                        + [_pct(e.get("other_ppl_change_mean")), f"{100 * (e.get('other_ppl_abs_change_mean') or 0):.3f}%"])
        lines.append(_table(["method"] + langs + ["mean", "mean abs"], rows))
        fell = [m for m in methods if all(evals[m]["ppl_change"][l] < 0 for l in langs)]
        if langs and len(fell) == len(methods):
            lines.append("Note: every other language's perplexity *fell* under every method. The texts share one "
                         "domain (e.g. the built-in corpus: software translations), so training on the target's "
                         "text also teaches the domain; here the other-language change measures how much a method "
                         "moves the model outside the target language, not forgetting.\n")
        rows = [["before"] + [_num(any_eval["before"]["ppl"][l], 2) for l in langs]]
        for m in methods:
            rows.append([m] + [_num(evals[m]["after"]["ppl"][l], 2) for l in langs])
        lines.append("Perplexities (before = base model):\n")
        lines.append(_table(["model"] + langs, rows))

    lines.append("## Cost\n")
    rows = []
    for m in methods:
        r = runs.get(m) or evals[m]["run"]
        rows.append([m, f"{r['trainable_params']:,}", fmt_bytes(r.get("peak_memory_bytes")),
                     f"{r['mean_step_time_s']:.2f} s", f"{r['tokens_per_s']:.0f}", r.get("steps", "n/a"),
                     f"{r.get('tokens_trained', 0):,}", f"{r.get('lr', float('nan')):g}"])
    kind = next((runs[m].get("peak_memory_kind") for m in methods if m in runs), "rss")
    lines.append(_table(["method", "trainable params", f"peak memory ({'RSS' if kind == 'rss' else 'CUDA max allocated'})",
                         "step time", "tokens/s", "steps", "tokens", "lr"], rows))

    if any_eval is not None and any_eval["before"].get("alignment"):
        lines.append(f"## Cross-lingual alignment ({target} vs {any_eval['settings']['align_with']})\n")
        lines.append("Cosine similarity of mean-pooled hidden states of parallel sentences, mean over layers "
                     "and at the last layer.\n")
        b = any_eval["before"]["alignment"]
        rows = [["before", _num(sum(b) / len(b)), _num(b[-1])]]
        for m in methods:
            a = evals[m]["after"]["alignment"]
            rows.append([m, _num(sum(a) / len(a)), _num(a[-1])])
        lines.append(_table(["model", "mean over layers", "last layer"], rows))

    if any_eval is not None:
        lines.append("## Where the weights changed\n")
        lines.append("Relative update norm of the MLP weights, ||W_after - W_before|| / ||W_before||, per layer "
                     "(mean and max over layers), and the largest change outside the MLPs.\n")
        rows = []
        for m in methods:
            pl = evals[m]["update_norms"]["per_layer"]
            mlp = [e.get("mlp", 0.0) for e in pl]
            other = evals[m]["update_norms"]["other"]
            attn = [e.get("attention", 0.0) for e in pl]
            top = max(other.items(), key=lambda kv: kv[1]) if other else None
            rows.append([m, f"{sum(mlp) / len(mlp):.2e}", f"{max(mlp):.2e}", f"{max(attn):.2e}",
                         f"{top[0]} {top[1]:.2e}" if top else "none"])
        lines.append(_table(["method", "MLP mean", "MLP max", "attention max", "outside layers"], rows))

    if neuron_table:
        lines.append("## Language neurons per layer\n")
        lines.append(neuron_table)

    if timings:
        lines.append("## Time\n")
        rows = []
        for k, v in timings.items():
            wall, cpu = (v, None) if isinstance(v, (int, float)) else (v[0], v[1])
            rows.append([k, f"{wall:.1f}", "n/a" if cpu is None else f"{cpu:.1f}"])
        lines.append("Wall-clock seconds, and CPU seconds of this process and its children (on an otherwise idle "
                     "machine, wall = CPU / threads).\n")
        lines.append(_table(["stage", "wall s", "CPU s"], rows))

    if plots:
        lines.append("## Plots\n")
        for p in plots:
            lines.append(f"![{Path(p).stem}]({Path(p).name})\n")
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------- plots
def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    tmp = path.parent / f".{path.stem}.tmp-{os.getpid()}{path.suffix}"
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path


def plot_ppl(evals: Mapping[str, Any], path: Path) -> Path:
    methods = _methods(evals)
    e0 = next(iter(evals.values()))
    target = e0["settings"]["target"]
    langs = [l for l in e0["settings"]["languages"] if l != target]
    fig = _figure(11, 4.2)
    ax = fig.add_subplot(1, 2, 1)
    labels = ["before"] + methods
    vals = [e0["before"]["ppl"][target]] + [evals[m]["after"]["ppl"][target] for m in methods]
    ax.bar(range(len(labels)), vals, color=[_COLORS.get(l, "#444444") for l in labels])
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    lo, hi = min(vals), max(vals)
    pad = max((hi - lo) * 0.5, hi * 0.002)
    ax.set_ylim(max(0.0, lo - pad), hi + pad)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"target language {target}: before / after")
    ax = fig.add_subplot(1, 2, 2)
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(langs) + 1)]
        ys = [100 * evals[m]["ppl_change"][l] for l in langs] + [100 * evals[m]["ppl_change"][target]]
        ax.bar(xs, ys, width=width, label=m, color=_COLORS.get(m))
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(langs) + 1))
    ax.set_xticklabels(langs + [f"{target}\n(target)"], rotation=0, fontsize=8)
    ax.set_ylabel("perplexity change (%)")
    ax.set_title("perplexity change per language")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_curves(logs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path:
    fig = _figure(11, 4)
    ax1 = fig.add_subplot(1, 2, 1)
    ax2 = fig.add_subplot(1, 2, 2)
    for m in [m for m in METHOD_ORDER if m in logs] + [m for m in logs if m not in METHOD_ORDER]:
        recs = logs[m]
        tr = [r for r in recs if r.get("loss") is not None]
        ax1.plot([r["tokens"] for r in tr], [r["loss"] for r in tr], label=m, color=_COLORS.get(m), lw=1.2)
        va = [r for r in recs if r.get("val_ppl") is not None]
        ax2.plot([r["tokens"] for r in va], [r["val_ppl"] for r in va], marker="o", label=m, color=_COLORS.get(m))
    ax1.set_xlabel("training tokens")
    ax1.set_ylabel("training loss")
    ax1.set_title("training loss")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("training tokens")
    ax2.set_ylabel("validation perplexity (target)")
    ax2.set_title("validation perplexity")
    ax2.legend(fontsize=8)
    return _save(fig, path)


def plot_alignment(evals: Mapping[str, Any], path: Path) -> Path:
    methods = _methods(evals)
    e0 = next(iter(evals.values()))
    fig = _figure(6.5, 4)
    ax = fig.add_subplot(1, 1, 1)
    b = e0["before"]["alignment"]
    ax.plot(range(len(b)), b, color=_COLORS["before"], lw=2.5, label="before")
    for m in methods:
        a = evals[m]["after"]["alignment"]
        ax.plot(range(len(a)), a, label=m, color=_COLORS.get(m), lw=1.2)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("cosine similarity")
    ax.set_title(f"alignment {e0['settings']['target']} vs {e0['settings']['align_with']}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_norms(evals: Mapping[str, Any], path: Path) -> Path:
    methods = _methods(evals)
    fig = _figure(6.5, 4)
    ax = fig.add_subplot(1, 1, 1)
    for m in methods:
        pl = evals[m]["update_norms"]["per_layer"]
        ys = [e.get("mlp", 0.0) if e.get("mlp", 0.0) > 0 else float("nan") for e in pl]  # unchanged: a gap
        ax.plot(range(len(ys)), ys, marker=".", label=m, color=_COLORS.get(m))
    ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("||dW|| / ||W|| (MLP)")
    ax.set_title("relative MLP weight update per layer")
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_report(out_dir: Path, *, setup: Mapping[str, Any], evals: Mapping[str, Mapping[str, Any]],
                 runs: Mapping[str, Mapping[str, Any]], logs: Mapping[str, Sequence[Mapping[str, Any]]],
                 neuron_set: Any = None, timings: Optional[Mapping[str, Any]] = None) -> Path:
    """Write the PNGs and ``report.md`` (last) into ``out_dir``; returns report.md's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: List[str] = []
    if evals:
        plots.append(str(plot_ppl(evals, out_dir / PLOTS["ppl"])))
    if neuron_set is not None:
        from ..neurons import plot_expert_heatmap, plot_heatmap

        for name, plot, applies in ((PLOTS["neurons"], plot_heatmap, neuron_set.num_layers > 0),
                                    (EXPERT_PLOT, plot_expert_heatmap, neuron_set.has_experts)):
            if applies:
                tmp = out_dir / f".{name}.tmp-{os.getpid()}.png"
                plot(neuron_set, tmp)
                os.replace(tmp, out_dir / name)
                plots.append(str(out_dir / name))
    if logs:
        plots.append(str(plot_curves(logs, out_dir / PLOTS["curves"])))
    if evals and next(iter(evals.values()))["before"].get("alignment"):
        plots.append(str(plot_alignment(evals, out_dir / PLOTS["alignment"])))
    if evals:
        plots.append(str(plot_norms(evals, out_dir / PLOTS["norms"])))
    table = None
    if neuron_set is not None:
        from ..neurons import per_layer_table

        table = per_layer_table(neuron_set)
    text = render_markdown(setup=setup, evals=evals, runs=runs, neuron_table=table, timings=timings, plots=plots)
    return write_atomic(out_dir / "report.md", text)
