#!/usr/bin/env python
"""Deactivation check of LAPE language neurons on a real model (Tang et al. 2024, Fig. 3).

collect statistics -> identify language neurons -> for each language k, zero k's neurons (and,
as a control, a random set of the same size) and measure every language's validation
perplexity. LAPE's finding: deactivating k's neurons raises k's perplexity far more than the
other languages'. Writes to --out: ablation.md (the tables), ablation.png (perplexity-change
heat maps, LAPE and random sets), neurons_per_layer.png (dense MLPs) and, for a mixture-of-experts
model, neurons_per_expert.png (expert neurons are deactivated too), results.json.

    python examples/ablation.py                      # Gemma-3-270M, built-in corpus
    python examples/ablation.py --languages en de fr cy eu --val-tokens 1024 --out /tmp/abl
    python -m lape_kernels.experiment.toy /tmp/toy qwen3_moe    # a tiny MoE model + toy corpus
    python examples/ablation.py --model /tmp/toy/model --data /tmp/toy/corpus --languages aa bb cc en \
        --tokens 2048 --seq-len 64 --val-tokens 512 --top-rate 0.1 --out /tmp/abl-moe
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

DEFAULT_LANGUAGES = ["en", "de", "fr", "es", "ru", "cy", "eu", "is"]


def run_ablation(model: str = "gemma3-270m", languages: Sequence[str] = DEFAULT_LANGUAGES, out: str = "examples/output/ablation",
                 *, data: Optional[str] = None, tokens: int = 8192, seq_len: int = 512, val_tokens: int = 1024,
                 batch_size: int = 4, top_rate: float = 0.01, filter_rate: float = 0.95,
                 activation_bar_ratio: float = 0.95, seed: int = 0, device: str = "auto", dtype: str = "float32",
                 collect_dtype: str = "fast", cache_dir: Optional[str] = None, quiet: bool = False) -> Dict[str, Any]:
    """Run the check; returns (and writes to ``out/results.json``) the perplexity matrices."""
    import lape_kernels
    from lape_kernels import patching
    from lape_kernels.experiment.collect import collect, identify_neurons
    from lape_kernels.experiment.demo import fast_dtype
    from lape_kernels.experiment.inputs import load_corpus, load_model, pack_validation
    from lape_kernels.experiment.metrics import language_perplexities
    from lape_kernels.experiment.outputs import write_json_atomic
    from lape_kernels.experiment.progress import now
    from lape_kernels.experiment.runtime import parse_device, parse_dtype
    from lape_kernels.neurons import deactivate, plot_expert_heatmap, plot_heatmap

    languages = list(languages)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = now()

    def say(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    say(f"collect: {tokens} tokens x {len(languages)} languages")
    collect(model, languages, str(out_dir / "stats"), data=data, tokens=tokens, seq_len=seq_len,
            batch_size=batch_size, device=device, dtype=fast_dtype(device) if collect_dtype == "fast" else collect_dtype,
            cache_dir=cache_dir, quiet=quiet)
    ns = identify_neurons([str(out_dir / "stats")], str(out_dir / "neurons"), top_rate=top_rate,
                          filter_rate=filter_rate, activation_bar_ratio=activation_bar_ratio, overwrite=True)
    say("neurons: " + ", ".join(f"{l} {ns.total(l)}" for l in languages))
    plots = []
    if ns.num_layers:
        plots.append(plot_heatmap(ns, out_dir / "neurons_per_layer.png").name)
    if ns.has_experts:  # a mixture-of-experts model: MoE layer x expert counts per language
        plots.append(plot_expert_heatmap(ns, out_dir / "neurons_per_expert.png").name)

    dev = parse_device(device)
    m, tok = load_model(model, parse_dtype(dtype, dev, auto=torch.float32), dev, cache_dir)
    corpus = load_corpus(data, languages, cache_dir=cache_dir)
    packed = pack_validation(tok, corpus, languages, seq_len, val_tokens)
    lape_kernels.patch(m)
    from lape_kernels.experiment.runtime import eval_loss_chunk
    from lape_kernels.training.loss import install_chunked_loss

    install_chunked_loss(m, chunk_size=eval_loss_chunk(m))
    for p in m.parameters():  # nothing trains: skip the loss's gradient work
        p.requires_grad_(False)

    def ppl(tag: str) -> Dict[str, float]:
        return language_perplexities(m, packed, batch_size, dev, desc=tag)

    base = ppl("base")
    say("base ppl: " + ", ".join(f"{l} {base[l]:.2f}" for l in languages))
    lape: Dict[str, Dict[str, float]] = {}
    rand: Dict[str, Dict[str, float]] = {}
    for k in languages:
        if ns.total(k) == 0:
            say(f"{k}: no neurons identified; skipped")
            continue
        with deactivate(m, (ns, k)):
            lape[k] = ppl(f"-{k}")
        if ns.has_experts:  # the same total over all dense and expert neurons
            dense, experts = ns.random_experts_like(k, seed=seed, mode="total")
            control = deactivate(m, dense, expert_neurons=experts)
        else:
            control = deactivate(m, ns.random_like(k, seed=seed, mode="total"))
        with control:
            rand[k] = ppl(f"-rand{k}")
        say(f"deactivate {k} ({ns.total(k)} neurons): own ppl {base[k]:.2f} -> {lape[k][k]:.2f}; "
            f"random: {rand[k][k]:.2f}")

    def change(table: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, float]]:
        return {k: {j: table[k][j] / base[j] - 1.0 for j in languages} for k in table}

    d_lape, d_rand = change(lape), change(rand)
    rows = list(d_lape)
    diag = [d_lape[k][k] for k in rows]
    off = [d_lape[k][j] for k in rows for j in languages if j != k]
    dominates = {k: d_lape[k][k] > sum(d_lape[k][j] for j in languages if j != k) / max(1, len(languages) - 1)
                 for k in rows}
    # column view: is language j hurt most by its own neurons?
    own_max = {j: max(rows, key=lambda k: d_lape[k][j]) == j for j in rows}
    summary = {
        "mean_diagonal_change": sum(diag) / len(diag) if diag else None,
        "mean_off_diagonal_change": sum(off) / len(off) if off else None,
        "mean_random_diagonal_change": (sum(d_rand[k][k] for k in rows) / len(rows)) if rows else None,
        "diagonal_dominates_row": dominates,
        "diagonal_dominates_rows": sum(dominates.values()),
        "own_neurons_hurt_most": own_max,
        "seconds": now() - t0,
    }
    settings = {"model": model, "data": data or "builtin", "languages": languages, "tokens": tokens,
                "seq_len": seq_len, "val_tokens": val_tokens, "top_rate": top_rate, "filter_rate": filter_rate,
                "activation_bar_ratio": activation_bar_ratio, "seed": seed, "dtype": dtype,
                "neurons": {l: ns.total(l) for l in languages}, "plots": plots}
    results = {"settings": settings, "base_ppl": base, "lape_ppl": lape, "random_ppl": rand,
               "lape_change": d_lape, "random_change": d_rand, "summary": summary}
    write_json_atomic(out_dir / "results.json", results)
    _plot(d_lape, d_rand, languages, out_dir / "ablation.png")
    (out_dir / "ablation.md").write_text(_markdown(results))
    say(f"mean perplexity change: own language {100 * summary['mean_diagonal_change']:+.1f}%, other languages "
        f"{100 * summary['mean_off_diagonal_change']:+.1f}%, random set (own) "
        f"{100 * summary['mean_random_diagonal_change']:+.1f}%; wrote {out_dir}/ablation.md")
    return results


def _markdown(r: Dict[str, Any]) -> str:
    s, langs = r["settings"], r["settings"]["languages"]

    def table(change: Dict[str, Dict[str, float]]) -> str:
        lines = ["| deactivated \\ evaluated | " + " | ".join(langs) + " |",
                 "| :--- | " + " | ".join("---:" for _ in langs) + " |"]
        for k in change:
            cells = [(f"**{100 * change[k][j]:+.1f}%**" if j == k else f"{100 * change[k][j]:+.1f}%") for j in langs]
            lines.append(f"| {k} ({s['neurons'][k]}) | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    sm = r["summary"]
    return (
        f"# Deactivating language neurons: {s['model']}\n\n"
        f"`python examples/ablation.py` — {s['tokens']:,} tokens per language for the statistics, "
        f"top_rate {s['top_rate']}, {s['val_tokens']:,} validation tokens per language, {s['dtype']}.\n\n"
        "Perplexity change when the row language's LAPE neurons are zeroed (neuron count in brackets):\n\n"
        + table(r["lape_change"])
        + "\nControl: a random set of the same size (drawn over all layers):\n\n"
        + table(r["random_change"])
        + "\nBase perplexity: " + ", ".join(f"{l} {r['base_ppl'][l]:.2f}" for l in langs) + "\n\n"
        f"Mean change of the deactivated language's own perplexity: {100 * sm['mean_diagonal_change']:+.1f}%; "
        f"of the other languages': {100 * sm['mean_off_diagonal_change']:+.1f}%; own language under a random set "
        f"of the same size: {100 * sm['mean_random_diagonal_change']:+.1f}%. The own-language change exceeds the mean "
        f"of the others in {sm['diagonal_dominates_rows']} of {len(r['lape_change'])} rows.\n\n"
        "![perplexity change](ablation.png)\n\n"
        + "".join(f"![{p.rsplit('.', 1)[0].replace('_', ' ')}]({p})\n" for p in s.get("plots", ["neurons_per_layer.png"]))
    )


def _plot(d_lape, d_rand, languages: List[str], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = list(d_lape)
    fig = Figure(figsize=(2.2 + 1.1 * len(languages), 0.5 + 0.5 * len(rows)))
    FigureCanvasAgg(fig)
    mats = [[[100 * d[k][j] for j in languages] for k in rows] for d in (d_lape, d_rand)]
    vmax = max(1e-9, max(abs(v) for m_ in mats for row in m_ for v in row))
    for i, (mat, title) in enumerate(zip(mats, ("LAPE neurons zeroed", "random neurons zeroed"))):
        ax = fig.add_subplot(1, 2, i + 1)
        im = ax.imshow(mat, cmap="Reds", vmin=0, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(languages)))
        ax.set_xticklabels(languages)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(rows)
        ax.set_xlabel("evaluated language")
        ax.set_ylabel("deactivated language")
        ax.set_title(title)
        for a in range(len(rows)):
            for b in range(len(languages)):
                ax.text(b, a, f"{mat[a][b]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if mat[a][b] > 0.6 * vmax else "black")
    fig.colorbar(im, ax=fig.axes, label="perplexity change (%)")
    fig.savefig(path, dpi=110)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--data", default=None)
    p.add_argument("--languages", nargs="+", default=DEFAULT_LANGUAGES)
    p.add_argument("--tokens", type=int, default=8192, help="statistics tokens per language")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--val-tokens", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--top-rate", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="examples/output/ablation")
    a = p.parse_args(argv)
    try:
        run_ablation(a.model, a.languages, a.out, data=a.data, tokens=a.tokens, seq_len=a.seq_len,
                     val_tokens=a.val_tokens, batch_size=a.batch_size, top_rate=a.top_rate, seed=a.seed,
                     device=a.device, dtype=a.dtype, cache_dir=a.cache_dir)
    except Exception as exc:  # one line, like the CLI
        from lape_kernels.experiment.errors import one_line

        print(f"ablation: error: {one_line(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
