"""Training-step memory and speed of expert-neuron training on a mixture-of-experts model, side by side:

    paper   the paper's slice training through the stacked expert weights
            (``lape_kernels.testing.slice_training(..., expert_neurons=...)``): every forward clones
            ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` of every MoE layer, scatters the
            trainable slices in and runs the model's own experts implementation with dense autograd
            (weight-shaped gradients), AdamW on the slices
    ours    ``lape_kernels.patch(model, expert_neurons=...)``: the same slices as small parameters,
            one sparse Function per MoE layer inside the model's routing, chunked LM loss

Each configuration runs in its own subprocess on the same random-init Qwen3-MoE shape (transformers'
init), the same batch and the same random expert neurons (``--frac`` of each expert's neurons).
Peak memory: peak RSS of the worker during the measured steps (VmHWM reset after warm-up, glibc's
mmap threshold fixed as in ``bench_train.py``); step time: median of forward + backward + AdamW
step. Prints a table with ours/paper ratios.

    python benchmarks/bench_moe_train.py                       # 4 layers, 16 experts x 512, hidden 512, 1 x 512 tokens
    python benchmarks/bench_moe_train.py --experts 64 --inter 256 --topk 8
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_train import _reset_peak_rss, _vm  # noqa: E402  (one owner of the RSS reading)

CONFIGS = ("paper", "ours")


def run_worker(config: str, args) -> Dict[str, Any]:
    import torch

    import lape_kernels as lk
    from lape_kernels.testing import random_expert_neurons, slice_training, tiny_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = tiny_model("qwen3_moe", num_layers=args.layers, intermediate=args.inter, varied_signs=False,
                       experts_implementation=args.impl, hidden_size=args.hidden, num_experts=args.experts,
                       num_experts_per_tok=args.topk, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    k = max(1, round(args.frac * args.inter))
    sel = random_expert_neurons(args.layers, args.experts, args.inter, k, seed=0)
    if config == "paper":
        params = slice_training(model, None, sel)
    else:
        lk.patch(model, expert_neurons=sel)
        params = lk.trainable_parameters(model)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            gc.collect()
            _reset_peak_rss()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    times.sort()
    return {"config": config, "step_s": times[len(times) // 2], "peak_mb": round(_vm("VmHWM") / 2**20, 1),
            "trainable": int(sum(p.numel() for p in params)), "loss_first": losses[0], "loss_last": losses[-1],
            "stacked_weight_mb": round(args.layers * 3 * args.experts * args.inter * args.hidden *
                                       (4 if args.dtype == "fp32" else 2) / 2**20, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--inter", type=int, default=512, help="each expert's intermediate size")
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frac", type=float, default=0.01, help="random neurons per expert (fraction of its intermediate)")
    p.add_argument("--impl", default="grouped_mm", choices=["eager", "grouped_mm", "batched_mm"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--malloc-mmap-threshold", type=int, default=131072)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(run_worker(args.worker, args)))
        return 0
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(args.malloc_mmap_threshold), PYTHONPATH=str(ROOT))
    passed = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
              if k not in ("out", "worker", "worker_out") and v is not None]
    results: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in CONFIGS:
            out = Path(tmp) / f"{config}.json"
            subprocess.run([sys.executable, str(Path(__file__).resolve()), *passed, "--worker", config,
                            "--worker-out", str(out)], check=True, env=env)
            results.append(json.loads(out.read_text()))
    paper, ours = results
    print(f"Qwen3-MoE shape: {args.layers} layers, {args.experts} experts x {args.inter} (top-{args.topk}), hidden "
          f"{args.hidden}, {args.batch} x {args.seq} tokens, {args.dtype}, {args.impl}; {ours['trainable']} trainable "
          f"values; stacked expert weights {paper['stacked_weight_mb']} MB")
    print(f"{'config':8s} {'step s':>8s} {'peak RSS MB':>12s} {'loss first -> last':>22s}")
    for r in results:
        print(f"{r['config']:8s} {r['step_s']:8.3f} {r['peak_mb']:12.1f} {r['loss_first']:10.4f} -> {r['loss_last']:.4f}")
    print(f"ours / paper: step time x{ours['step_s'] / paper['step_s']:.2f}, peak RSS x{ours['peak_mb'] / paper['peak_mb']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
