#!/usr/bin/env python
"""Language neurons of a mixture-of-experts model, per MoE layer and expert: the README's heat map.

A tiny random Qwen3-MoE (4 layers, 8 experts of intermediate 128, top-2; ``lape_kernels.testing``)
and the toy corpus (four "languages", each drawn from its own alphabet), saved as a local model
directory; then the command line's own ``collect`` and ``identify``, and
``lape_kernels.neurons.plot_expert_heatmap``. Writes to --out (default docs/results):
moe_neurons_per_expert.png and moe_neurons_per_expert.md (the tables). CPU, about a minute.

    python examples/moe_heatmap.py [--family qwen3_moe|mixtral|olmoe|qwen2_moe] [--out docs/results]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import List, Optional

LANGS = ["aa", "bb", "cc", "en"]
#: the config field of each tiny MoE family's expert count
EXPERTS_FIELD = {"qwen3_moe": "num_experts", "qwen2_moe": "num_experts", "olmoe": "num_experts",
                 "mixtral": "num_local_experts"}


def run(family: str = "qwen3_moe", out: str = "docs/results", tokens: int = 4096, top_rate: float = 0.05,
        work: Optional[str] = None) -> Path:
    from lape_kernels.experiment.collect import collect, identify_neurons
    from lape_kernels.experiment.toy import make_toy_setup
    from lape_kernels.neurons import per_layer_table, plot_expert_heatmap

    root = Path(work or tempfile.mkdtemp(prefix="lape-moe-"))
    model, corpus = make_toy_setup(str(root), family=family, num_layers=4, **{EXPERTS_FIELD[family]: 8})
    collect(str(model), LANGS, str(root / "stats"), data=str(corpus), tokens=tokens, seq_len=64, batch_size=8,
            dtype="float32", overwrite=True)
    ns = identify_neurons([str(root / "stats")], str(root / "neurons"), top_rate=top_rate, overwrite=True)
    out_dir = Path(out)
    png = plot_expert_heatmap(ns, out_dir / "moe_neurons_per_expert.png",
                              title=f"language neurons per expert (tiny {family}, toy corpus)", dpi=80)
    lines = [f"# Language neurons per expert: tiny {family}\n",
             f"`python examples/moe_heatmap.py --family {family}`: 4 layers x 8 experts (intermediate 128, top-2), "
             f"{tokens:,} toy tokens per language, top_rate {top_rate} over all {ns.num_units:,} units "
             "(one LAPE ranking over dense and expert neurons).\n",
             per_layer_table(ns)]
    for lang in ns.languages:
        counts = ns.expert_counts(lang)
        lines.append(f"\n{lang}: neurons per (layer, expert)\n\n| layer | " + " | ".join(f"e{e}" for e in range(counts.shape[1]))
                     + " |\n| ---: |" + " ---: |" * counts.shape[1] + "\n"
                     + "".join(f"| {layer} | " + " | ".join(str(int(v)) for v in row) + " |\n"
                               for layer, row in zip(ns.expert_layers, counts)))
    lines.append(f"\n![neurons per expert]({png.name})\n")
    (out_dir / "moe_neurons_per_expert.md").write_text("\n".join(lines))
    return png


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="qwen3_moe", choices=sorted(EXPERTS_FIELD))
    p.add_argument("--out", default="docs/results")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--top-rate", type=float, default=0.05)
    a = p.parse_args(argv)
    print(run(a.family, a.out, a.tokens, a.top_rate))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
