"""Training-step memory and speed: sparse neuron fine-tuning (ours) against the alternatives.

Each configuration runs in its OWN subprocess (so peak memory is that configuration's alone),
on the same random-init model shape, the same batch and the same neurons:

    full    full fine-tuning (every parameter, AdamW)
    ffn     FFN-only fine-tuning (every MLP weight)
    paper   the paper's slice training: every forward clones each full MLP weight, scatters the
            trainable slices in and runs dense autograd (dense dW), AdamW on the slices
    lora    PEFT LoRA r=32 on gate/up/down
    ours    lape_kernels.patch(model, neurons=...): sparse MLP autograd + chunked LM loss
    ours-recompute-up  ours with recompute="up": the MLP's up projection is recomputed in
            backward instead of kept (one more GEMM per layer, T x I fewer values per layer)
    floor   no parameter trained at all, but the gradient still flows down to the first layer's
            input (our patched MLPs, chunked loss): the work every exact method that trains
            neurons in every layer must do (forward + input-gradient backward), so no such method
            can be faster than this; its ratio to full FT is the lower bound on "time vs full"
    ours-hfloss, ours-recompute-all  (ablations, not in the default set) ours with HF's standard
            loss; ours with recompute="gate_up"

Peak memory: CPU = peak RSS of the worker during the measured steps (VmHWM reset after
warm-up), with glibc's MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB (--malloc-mmap-threshold) so that
freed tensors go back to the OS and RSS tracks live memory rather than what glibc's heap keeps
(its dynamic threshold otherwise inflates RSS by hundreds of MB, differently per run);
CUDA = torch.cuda.max_memory_allocated. Step time = median over the measured steps of
forward + backward + optimizer step. Results: a table on stdout and markdown + CSV + PNG in
--out (default reports/bench_train).

    python benchmarks/bench_train.py                       # CPU, SmolLM2-135M shape, fp32, 1x512
    python benchmarks/bench_train.py --device cuda --shape llama-3.1-8b --seq 4096 --dtype bf16 \\
        --masks /work/shared/data/released-masks/llama-3.1-5 --language mt
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lape_kernels.dtypes import SHORT_DTYPE_NAMES  # noqa: E402

SHAPES: Dict[str, Dict[str, Any]] = {
    # HuggingFaceTB/SmolLM2-135M
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5),
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5),
    # for smoke tests of this script
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False, max_position_embeddings=2048),
}
CONFIGS = ["full", "ffn", "paper", "lora", "ours", "ours-recompute-up", "floor"]
ALL_CONFIGS = CONFIGS + ["ours-hfloss", "ours-recompute-all"]
RECOMPUTE = {"ours-recompute-up": "up", "ours-recompute-all": "gate_up"}
#: configurations that are a method of the experiment (``lape-kernels finetune --method``)
EXPERIMENT_METHOD = {"full": "full", "ffn": "ffn", "lora": "lora", "ours": "neurons", "ours-hfloss": "neurons",
                     "ours-recompute-up": "neurons", "ours-recompute-all": "neurons"}
#: baselines measured as users run them: Hugging Face's own forward and loss (not patched)
HF_BASELINES = ("full", "ffn", "lora")
# language order of the released LAPE masks (see /work/shared/data/released-masks/README.md)
RELEASED_LANGUAGES = ["mt", "af", "is", "cy", "mk", "lv", "lt", "sl", "sk", "et", "ka", "ne"]
DTYPES = tuple(SHORT_DTYPE_NAMES)


# ----------------------------------------------------------------------------- model + configs


def build_model(shape: str, device: str, dtype_name: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lape_kernels.dtypes import dtype_from_name

    cfg = LlamaConfig(**SHAPES[shape])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype_from_name(dtype_name))
    model.config.use_cache = False
    return model.train()


def select_neurons(model, args) -> List[Any]:
    """Per-layer int64 index tensors: a released mask (--masks/--language) or random --frac."""
    from lape_kernels.introspection import mlp_shape
    from lape_kernels.testing import random_neurons

    L, _, inter = mlp_shape(model)
    if args.masks:
        from lape_kernels.neurons import NeuronSet

        ns = NeuronSet.load(args.masks, languages=RELEASED_LANGUAGES, intermediate_size=inter)
        ns.validate(model)
        return ns[args.language]
    return random_neurons(L, inter, max(1, round(args.frac * inter)), seed=1)


def _experiment_setup(config: str, model, neurons, args):
    """The experiment's own setup of the method (``setup_method``, as ``lape-kernels finetune``
    runs it); the Hugging Face baselines are then unpatched, so they run HF's forward and loss."""
    import lape_kernels
    from lape_kernels.experiment.config import FinetuneConfig
    from lape_kernels.experiment.methods import setup_method
    from lape_kernels.introspection import mlp_shape
    from lape_kernels.neurons import NeuronSet

    cfg = FinetuneConfig(model=args.shape, language=args.language, method=EXPERIMENT_METHOD[config], out="",
                         lora_r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                         recompute=RECOMPUTE.get(config, "none"))
    shape = mlp_shape(model)
    selection = (NeuronSet({args.language: neurons}, shape.num_layers, shape.intermediate_size), neurons)
    model, _, _ = setup_method(model, cfg, selection)
    if config in HF_BASELINES:
        get_base = getattr(model, "get_base_model", None)  # LoRA: the PEFT model's inner HF model
        lape_kernels.unpatch(get_base() if callable(get_base) else model)
    return model


def setup(config: str, model, neurons, args):
    """Make ``model`` trainable the way ``config`` says; returns (model, trainable params)."""
    import lape_kernels
    from lape_kernels.training import install_chunked_loss, uninstall_chunked_loss

    if config in EXPERIMENT_METHOD:
        model = _experiment_setup(config, model, neurons, args)
        if config == "ours-hfloss":
            uninstall_chunked_loss(model)
        elif config.startswith("ours") and args.chunk_size:
            install_chunked_loss(model, chunk_size=args.chunk_size)
        return model, [p for p in model.parameters() if p.requires_grad]
    if config == "paper":
        from lape_kernels.testing import slice_training

        return model, slice_training(model, neurons)
    if config == "floor":
        lape_kernels.patch(model)
        if args.chunk_size:
            install_chunked_loss(model, chunk_size=args.chunk_size)
        for p in model.parameters():
            p.requires_grad_(False)
        # the embeddings' output requires grad: backward runs through every layer down to layer 0
        model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
        return model, []
    raise ValueError(f"unknown config {config!r}; known: {ALL_CONFIGS}")


class _NoOptimizer:
    """The optimizer of a configuration with nothing to train (``floor``)."""

    def step(self):
        pass

    def zero_grad(self, set_to_none=True):
        pass


def _optimizer(params):
    import torch

    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01) if params else _NoOptimizer()


# ----------------------------------------------------------------------------- memory probes


def _vm(field: str) -> int:
    """A /proc/self/status field in bytes (Linux)."""
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024 if m else -1


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- worker


def run_worker(config: str, args) -> Dict[str, Any]:
    import torch

    device = args.device
    cuda = device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    res: Dict[str, Any] = {"config": config, "status": "ok", "threads": torch.get_num_threads()}
    try:
        # everything any configuration imports, so that RSS here is the same runtime baseline
        import peft  # noqa: F401
        import transformers  # noqa: F401
        import lape_kernels.experiment.finetune  # noqa: F401
        import lape_kernels.kernels.ops  # noqa: F401
        import lape_kernels.testing  # noqa: F401
        import lape_kernels.training  # noqa: F401

        gc.collect()
        res["rss_runtime_mb"] = round(_vm("VmRSS") / 2**20, 1)
        t_build = time.perf_counter()
        model = build_model(args.shape, device, args.dtype)
        neurons = select_neurons(model, args)
        res["neurons"] = int(sum(int(t.numel()) for t in neurons))
        model, params = setup(config, model, neurons, args)
        res["trainable_params"] = int(sum(p.numel() for p in params))
        res["build_s"] = round(time.perf_counter() - t_build, 2)
        opt = _optimizer(params)
        g = torch.Generator().manual_seed(123)
        V = model.config.vocab_size if hasattr(model, "config") else SHAPES[args.shape]["vocab_size"]
        ids = torch.randint(0, V, (args.batch, args.seq), generator=g).to(device)
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
        res["rss_before_mb"] = round(_vm("VmRSS") / 2**20, 1)
        if cuda:
            res["allocated_before_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)

        times, losses = [], []
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                gc.collect()
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                else:
                    _reset_peak_rss()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            losses.append(float(loss.detach()))
            if step >= args.warmup:
                times.append(dt)
        times.sort()
        med = times[len(times) // 2] if len(times) % 2 else 0.5 * (times[len(times) // 2 - 1] + times[len(times) // 2])
        res["step_s"] = med
        res["tokens_per_s"] = args.batch * args.seq / med
        res["loss_first"], res["loss_last"] = losses[0], losses[-1]
        if cuda:
            res["peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            res["peak_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        else:
            res["peak_mb"] = round(_vm("VmHWM") / 2**20, 1)
    except torch.OutOfMemoryError as e:
        res = {"config": config, "status": "OOM", "error": str(e).splitlines()[0][:200]}
    except RuntimeError as e:
        if "out of memory" in str(e).lower():
            res = {"config": config, "status": "OOM", "error": str(e).splitlines()[0][:200]}
        else:
            raise
    return res


def run_interleaved(configs: List[str], args) -> Dict[str, Any]:
    """Step times of several configurations in ONE process, alternating step by step.

    On a shared CPU the load drifts over minutes, so per-process medians taken one after the
    other are not comparable; alternating configurations step by step exposes every
    configuration to the same load. (Memory is still measured per process.)
    """
    import copy

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    base = build_model(args.shape, args.device, args.dtype)
    neurons = select_neurons(base, args)
    runs = {}
    for config in configs:
        model, params = setup(config, copy.deepcopy(base), neurons, args)
        runs[config] = (model, _optimizer(params))
    del base
    V = SHAPES[args.shape]["vocab_size"]
    ids = torch.randint(0, V, (args.batch, args.seq), generator=torch.Generator().manual_seed(123)).to(args.device)
    times: Dict[str, List[float]] = {c: [] for c in configs}
    for step in range(args.warmup + args.steps):
        for config, (model, opt) in runs.items():
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= args.warmup:
                times[config].append(time.perf_counter() - t0)
    out = {}
    for config, ts in times.items():
        ts.sort()
        out[config] = {"min_s": ts[0], "median_s": ts[len(ts) // 2]}
    return out


# ----------------------------------------------------------------------------- parent


def _worker_cmd(config: str, args, out_json: str) -> List[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config, "--worker-out", out_json,
           "--device", args.device, "--shape", args.shape, "--seq", str(args.seq), "--batch", str(args.batch),
           "--dtype", args.dtype, "--frac", str(args.frac), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--lora-r", str(args.lora_r), "--threads", str(args.threads)]
    if args.masks:
        cmd += ["--masks", args.masks, "--language", args.language]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    return cmd


def run_all(args) -> List[Dict[str, Any]]:
    results = []
    for config in args.configs:
        print(f"[bench_train] {config} ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out_json = os.path.join(tmp, "result.json")
            t0 = time.perf_counter()
            env = dict(os.environ)
            if not args.device.startswith("cuda") and args.malloc_mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
            try:
                proc = subprocess.run(_worker_cmd(config, args, out_json), capture_output=True, text=True,
                                      timeout=args.timeout, env=env)
                if os.path.exists(out_json):
                    with open(out_json) as f:
                        res = json.load(f)
                elif proc.returncode in (-9, 137):
                    res = {"config": config, "status": "OOM", "error": "worker killed (SIGKILL: out of host memory?)"}
                else:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                    res = {"config": config, "status": "error", "error": " | ".join(tail)[:300]}
            except subprocess.TimeoutExpired:
                res = {"config": config, "status": "timeout", "error": f"exceeded {args.timeout}s"}
            res["wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"[bench_train] {config}: {_short(res)}", flush=True)
        results.append(res)
    return results


def run_interleaved_subprocess(args, configs: List[str]) -> Dict[str, Any]:
    """``configs`` timed again in one process, step by step (see run_interleaved)."""
    print(f"[bench_train] interleaved timing of {configs} in one process ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out_json = os.path.join(tmp, "interleaved.json")
        cmd = _worker_cmd("interleaved", args, out_json) + ["--configs", ",".join(configs)]
        env = dict(os.environ)
        if not args.device.startswith("cuda") and args.malloc_mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout * 2, env=env)
        except subprocess.TimeoutExpired:
            print("[bench_train] interleaved timing: timeout", flush=True)
            return {}
        if not os.path.exists(out_json):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-2:]
            print(f"[bench_train] interleaved timing failed: {' | '.join(tail)[:300]}", flush=True)
            return {}
        with open(out_json) as f:
            return json.load(f)


def _short(r: Dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')} ({r.get('error', '')})"
    return f"peak {r['peak_mb']:.0f} MiB, step {r['step_s']:.3f} s, {r['tokens_per_s']:.0f} tok/s"


def _ratio(r, ref, key):
    if ref is None or r.get("status") != "ok" or ref.get("status") != "ok":
        return None
    return r[key] / ref[key]


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def report(results: List[Dict[str, Any]], args, meta: Dict[str, Any]) -> str:
    by = {r["config"]: r for r in results}
    full = by.get("full") if by.get("full", {}).get("status") == "ok" else None
    lora = by.get("lora") if by.get("lora", {}).get("status") == "ok" else None
    mem_unit = "CUDA max allocated" if args.device.startswith("cuda") else "peak RSS"
    lines = [
        f"# Training step: memory and speed ({args.shape}, {args.device}, {args.dtype}, batch {args.batch}x{args.seq})",
        "",
        ", ".join(f"{k}: {v}" for k, v in meta.items()),
        "",
        f"Peak memory = {mem_unit} during the measured steps; step = median of {args.steps} steps "
        f"(forward + backward + AdamW) after {args.warmup} warm-up steps; each configuration in its own process.",
        "",
        "| config | status | trainable params | peak MiB | step s | tokens/s | mem vs full | time vs full | mem vs LoRA | time vs LoRA |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        ok = r.get("status") == "ok"
        lines.append(
            f"| {r['config']} | {r['status'] if ok else r['status'] + ': ' + r.get('error', '')[:60]} | "
            f"{_fmt(r.get('trainable_params'), ',')} | {_fmt(r.get('peak_mb') if ok else None, '.0f')} | "
            f"{_fmt(r.get('step_s') if ok else None, '.3f')} | {_fmt(r.get('tokens_per_s') if ok else None, '.0f')} | "
            f"{_fmt(_ratio(r, full, 'peak_mb'), '.3f')} | {_fmt(_ratio(r, full, 'step_s'), '.3f')} | "
            f"{_fmt(_ratio(r, lora, 'peak_mb'), '.3f')} | {_fmt(_ratio(r, lora, 'step_s'), '.3f')} |"
        )
    if full and "step_s_interleaved" in full:
        lines += [
            "",
            f"Step time measured again in ONE process, the configurations alternating step by step (median of "
            f"{args.steps} rounds after {args.warmup}): every configuration sees the same machine load, so these "
            "ratios are the ones to trust on a shared machine:",
            "",
            "| config | step s (interleaved) | min s | time vs full |",
            "| --- | ---: | ---: | ---: |",
        ]
        for r in results:
            if "step_s_interleaved" in r:
                lines.append(f"| {r['config']} | {r['step_s_interleaved']:.3f} | {r['step_s_interleaved_min']:.3f} | "
                             f"{r['step_s_interleaved'] / full['step_s_interleaved']:.3f} |")
    if not args.device.startswith("cuda") and full and "rss_runtime_mb" in full:
        lines += [
            "",
            "Peak RSS above the runtime baseline (the worker's RSS after importing torch, transformers, peft and "
            "lape_kernels, before the model exists; the same for every configuration):",
            "",
            "| config | runtime MiB | peak above runtime MiB | vs full |",
            "| --- | ---: | ---: | ---: |",
        ]
        base_full = full["peak_mb"] - full["rss_runtime_mb"]
        for r in results:
            if r.get("status") == "ok" and "rss_runtime_mb" in r:
                above = r["peak_mb"] - r["rss_runtime_mb"]
                lines.append(f"| {r['config']} | {r['rss_runtime_mb']:.0f} | {above:.0f} | {above / base_full:.3f} |")
    ok_by = {c: r for c, r in by.items() if r.get("status") == "ok"}
    ours = ok_by.get("ours")
    paper = ok_by.get("paper")
    checks = []
    tkey = "step_s_interleaved" if ours and full and "step_s_interleaved" in ours and "step_s_interleaved" in full else "step_s"
    for name in ("ours", "ours-recompute-up", "ours-recompute-all"):
        r = ok_by.get(name)
        if r and full and tkey in r:
            m, t = r["peak_mb"] / full["peak_mb"], r[tkey] / full[tkey]
            checks.append(f"- {name} peak memory {m:.3f}x full FT (target <= 0.45x): {'PASS' if m <= 0.45 else 'FAIL'}")
            checks.append(f"- {name} step time {t:.3f}x full FT (target <= 0.5x): {'PASS' if t <= 0.5 else 'FAIL'}")
    floor = ok_by.get("floor")
    if floor and full and tkey in floor:
        t = floor[tkey] / full[tkey]
        checks.append(f"- floor (no weight gradient at all, input gradients through every layer) takes {t:.3f}x full "
                      "FT's step: no exact method that trains neurons in every layer can beat this ratio")
    if ours and paper:
        pk = tkey if tkey in paper else "step_s"
        ok = ours["peak_mb"] < paper["peak_mb"] and ours[pk] < paper[pk]
        checks.append(f"- ours vs paper's slice training: memory {ours['peak_mb'] / paper['peak_mb']:.3f}x, "
                      f"time {ours[pk] / paper[pk]:.3f}x (target < 1 on both): {'PASS' if ok else 'FAIL'}")
    if checks and tkey == "step_s_interleaved":
        checks.append("- (time ratios from the interleaved measurement)")
    if checks:
        lines += ["", "Targets:", ""] + checks
    return "\n".join(lines) + "\n"


def write_outputs(results, args, meta) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = report(results, args, meta)
    (out / "bench_train.md").write_text(md)
    keys = ["config", "status", "trainable_params", "neurons", "peak_mb", "peak_reserved_mb", "step_s",
            "tokens_per_s", "step_s_interleaved", "step_s_interleaved_min", "rss_runtime_mb", "rss_before_mb", "allocated_before_mb", "loss_first", "loss_last", "build_s", "wall_s", "error"]
    with open(out / "bench_train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow(r)
    (out / "bench_train.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    try:
        _plot(results, args, out / "bench_train.png")
    except Exception as e:  # the numbers matter more than the picture
        print(f"[bench_train] plot failed: {e}", file=sys.stderr)
    return out


def _plot(results, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["config"] for r in results]
    ok = [r.get("status") == "ok" for r in results]
    mem = [r["peak_mb"] / 1024 if o else 0.0 for r, o in zip(results, ok)]
    tps = [r["tokens_per_s"] if o else 0.0 for r, o in zip(results, ok)]
    colors = ["tab:green" if n.startswith("ours") else "lightsteelblue" if n == "floor" else "tab:gray"
              for n in names]
    full = next((r for r, o in zip(results, ok) if o and r["config"] == "full"), None)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, vals, title in ((axes[0], mem, "peak memory (GiB)"), (axes[1], tps, "tokens / s")):
        bars = ax.bar(names, vals, color=colors)
        for b, o, r in zip(bars, ok, results):
            if not o:
                ax.text(b.get_x() + b.get_width() / 2, 0, r.get("status", "?"), ha="center", va="bottom",
                        rotation=90, color="tab:red")
        ax.set_title(title)
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    if full:  # the issue's targets, relative to full fine-tuning
        axes[0].axhline(0.45 * full["peak_mb"] / 1024, color="tab:red", ls="--", lw=1, label="0.45x full FT")
        axes[1].axhline(2 * full["tokens_per_s"], color="tab:red", ls="--", lw=1, label="2x full FT")
        for ax in axes:
            ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"{args.shape} {args.device} {args.dtype} batch {args.batch}x{args.seq}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--frac", type=float, default=0.01, help="random neurons per layer (fraction of intermediate)")
    p.add_argument("--masks", default=None, help="released LAPE mask file (reference format) instead of random")
    p.add_argument("--language", default="mt")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {ALL_CONFIGS}")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=None, help="chunked-loss tokens per chunk (default: automatic)")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per configuration")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    p.add_argument("--interleaved", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the configurations in one process, alternating step by step "
                        "(default: on for CPU, off for CUDA, where the models would not fit together)")
    p.add_argument("--malloc-mmap-threshold", type=int, default=131072,
                   help="CPU: glibc MALLOC_MMAP_THRESHOLD_ for the workers (0: leave glibc's dynamic default)")
    p.add_argument("--out", default=str(ROOT / "reports" / "bench_train"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if args.interleaved is None:
        args.interleaved = not args.device.startswith("cuda")
    bad = [c for c in args.configs if c not in ALL_CONFIGS]
    if bad:
        p.error(f"unknown configs {bad}; known: {ALL_CONFIGS}")
    if args.masks and not Path(args.masks).exists():
        p.error(f"--masks {args.masks} does not exist")

    if args.worker == "interleaved":
        with open(args.worker_out, "w") as f:
            json.dump(run_interleaved(args.configs, args), f)
        return 0
    if args.worker:
        res = run_worker(args.worker, args)
        with open(args.worker_out, "w") as f:
            json.dump(res, f)
        return 0

    import torch

    meta = {"torch": torch.__version__, "threads": args.threads or torch.get_num_threads(),
            "neurons": f"{args.masks} [{args.language}]" if args.masks else f"random {args.frac:.2%} per layer"}
    if not args.device.startswith("cuda"):
        meta["MALLOC_MMAP_THRESHOLD_"] = args.malloc_mmap_threshold or "glibc default"
    if args.device.startswith("cuda") and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(0)
    elif args.device.startswith("cuda"):
        print("[bench_train] --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    results = run_all(args)
    ok = [r["config"] for r in results if r.get("status") == "ok"]
    if args.interleaved and len(ok) > 1:
        inter = run_interleaved_subprocess(args, ok)
        for r in results:
            if r["config"] in inter:
                r["step_s_interleaved"] = inter[r["config"]]["median_s"]
                r["step_s_interleaved_min"] = inter[r["config"]]["min_s"]
    out = write_outputs(results, args, meta)
    print()
    print(report(results, args, meta))
    print(f"[bench_train] wrote {out}/bench_train.md, .csv, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
