"""Memory over one training step (forward / backward / optimizer) for chosen configurations.

Each configuration (any of bench_train.py's: full, ffn, paper, lora, ours, ours-recompute-up, ...) runs in its
own process: build the model, one warm-up step (so AdamW's state exists), then one profiled step
while a sampler thread records memory every --interval-ms: process RSS on CPU,
``torch.cuda.memory_allocated`` on CUDA (plus a ``torch.cuda.memory._record_memory_history``
snapshot, ``<config>_snapshot.pickle``, for https://pytorch.org/memory_viz). Writes per-config
CSV samples, a JSON summary (peak per phase) and one PNG with the curves overlaid to --out.

    python benchmarks/memory_profile.py --configs ours,paper,full --shape smollm2-135m --seq 512
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_train as bt  # noqa: E402  (same directory)

PHASES = ("forward", "backward", "optimizer")


class Sampler(threading.Thread):
    """Polls a memory reading (bytes) until stopped."""

    def __init__(self, read, interval_s: float):
        super().__init__(daemon=True)
        self.read, self.interval_s = read, interval_s
        self.samples: List[tuple] = []
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            self.samples.append((time.perf_counter(), self.read()))
            time.sleep(self.interval_s)

    def stop(self):
        self._stop_event.set()
        self.join()
        self.samples.append((time.perf_counter(), self.read()))


def _rss_reader():
    page = os.sysconf("SC_PAGE_SIZE")
    f = open("/proc/self/statm", "rb", buffering=0)

    def read():
        f.seek(0)
        return int(f.read().split()[1]) * page

    return read


def run_worker(config: str, args) -> Dict[str, Any]:
    import torch

    cuda = args.device.startswith("cuda")
    model = bt.build_model(args.shape, args.device, args.dtype)
    neurons = bt.select_neurons(model, args)
    model, params = bt.setup(config, model, neurons, args)
    opt = bt._optimizer(params)  # a no-op for configurations with nothing to train (floor)
    V = bt.SHAPES[args.shape]["vocab_size"]
    ids = torch.randint(0, V, (args.batch, args.seq), generator=torch.Generator().manual_seed(123)).to(args.device)

    def step(marks=None):
        def mark(name):
            if marks is not None:
                if cuda:
                    torch.cuda.synchronize()
                marks[name] = time.perf_counter()

        mark("forward")
        loss = model(input_ids=ids, labels=ids).loss
        mark("backward")
        loss.backward()
        mark("optimizer")
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("end")

    step()  # warm-up: optimizer state allocated
    import gc

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        read = torch.cuda.memory_allocated
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    else:
        read = _rss_reader()
    marks: Dict[str, float] = {}
    sampler = Sampler(read, args.interval_ms / 1000.0)
    sampler.start()
    time.sleep(0.01)
    step(marks)
    time.sleep(0.01)
    sampler.stop()
    out = Path(args.out)
    summary: Dict[str, Any] = {"config": config, "device": args.device, "unit": "bytes"}
    if cuda:
        snap = out / f"{config}_snapshot.pickle"
        torch.cuda.memory._dump_snapshot(str(snap))
        torch.cuda.memory._record_memory_history(enabled=None)
        summary["snapshot"] = str(snap)
        summary["max_allocated"] = torch.cuda.max_memory_allocated()
    t0 = marks["forward"]
    samples = [(t - t0, m) for t, m in sampler.samples]
    with open(out / f"{config}_samples.csv", "w") as f:
        f.write("t_s,bytes\n")
        for t, m in samples:
            f.write(f"{t:.6f},{m}\n")
    bounds = [marks[p] - t0 for p in PHASES] + [marks["end"] - t0]
    summary["phases_s"] = {p: [bounds[i], bounds[i + 1]] for i, p in enumerate(PHASES)}
    summary["before"] = samples[0][1]
    summary["peak"] = max(m for _, m in samples)
    for i, p in enumerate(PHASES):
        inside = [m for t, m in samples if bounds[i] <= t <= bounds[i + 1]]
        summary[f"peak_{p}"] = max(inside) if inside else None
    summary["samples"] = len(samples)
    return summary


def plot(summaries: List[Dict[str, Any]], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    shades = {"forward": "tab:blue", "backward": "tab:orange", "optimizer": "tab:purple"}
    for s in summaries:
        data = [ln.split(",") for ln in (Path(args.out) / f"{s['config']}_samples.csv").read_text().splitlines()[1:]]
        t = [float(a) for a, _ in data]
        m = [int(b) / 2**20 for _, b in data]
        (line,) = ax.plot(t, m, label=f"{s['config']} (peak {s['peak'] / 2**20:.0f} MiB)")
        for p, (a, b) in s["phases_s"].items():
            ax.axvline(a, color=line.get_color(), ls=":", lw=0.8)
            if len(summaries) == 1:
                ax.axvspan(a, b, color=shades[p], alpha=0.08, label=p)
    what = "CUDA memory allocated" if args.device.startswith("cuda") else "process RSS"
    ax.set_xlabel("time since step start (s); dotted: forward / backward / optimizer starts")
    ax.set_ylabel(f"{what} (MiB)")
    ax.set_title(f"one training step: {args.shape}, {args.device}, {args.dtype}, batch {args.batch}x{args.seq}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="ours", help=f"comma-separated, from {bt.ALL_CONFIGS}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(bt.SHAPES))
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="fp32", choices=sorted(bt.DTYPES))
    p.add_argument("--frac", type=float, default=0.01)
    p.add_argument("--masks", default=None)
    p.add_argument("--language", default="mt")
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--interval-ms", type=float, default=1.0)
    p.add_argument("--malloc-mmap-threshold", type=int, default=131072,
                   help="CPU: glibc MALLOC_MMAP_THRESHOLD_ for the workers (0: glibc's default); see bench_train.py")
    p.add_argument("--timeout", type=int, default=1200)
    p.add_argument("--out", default=str(bt.ROOT / "reports" / "memory_profile"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in bt.ALL_CONFIGS]
    if bad:
        p.error(f"unknown configs {bad}; known: {bt.ALL_CONFIGS}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.worker:
        summary = run_worker(args.worker, args)
        (out / f"{args.worker}_summary.json").write_text(json.dumps(summary, indent=2))
        return 0

    summaries = []
    for config in configs:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config]
        for k in ("device", "shape", "seq", "batch", "dtype", "frac", "language", "lora_r", "interval_ms", "out"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        if args.masks:
            cmd += ["--masks", args.masks]
        if args.chunk_size:
            cmd += ["--chunk-size", str(args.chunk_size)]
        print(f"[memory_profile] {config} ...", flush=True)
        summary_path = out / f"{config}_summary.json"
        summary_path.unlink(missing_ok=True)
        env = dict(os.environ)
        if not args.device.startswith("cuda") and args.malloc_mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)  # as bench_train.py
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        except subprocess.TimeoutExpired:
            print(f"[memory_profile] {config}: timeout after {args.timeout}s")
            continue
        if proc.returncode != 0 or not summary_path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            status = "OOM" if proc.returncode in (-9, 137) or "out of memory" in " ".join(tail).lower() else "error"
            print(f"[memory_profile] {config}: {status}: {' | '.join(tail)[:300]}")
            continue
        s = json.loads(summary_path.read_text())
        summaries.append(s)
        phases = ", ".join(f"{ph} {s[f'peak_{ph}'] / 2**20:.0f}" for ph in PHASES if s.get(f"peak_{ph}") is not None)
        print(f"[memory_profile] {config}: before {s['before'] / 2**20:.0f} MiB, peak {s['peak'] / 2**20:.0f} MiB "
              f"(per phase: {phases}); {s['samples']} samples")
    if summaries:
        plot(summaries, args, out / "memory_profile.png")
        print(f"[memory_profile] wrote {out}/memory_profile.png and per-config CSV/JSON")
    return 0 if len(summaries) == len(configs) else 1


if __name__ == "__main__":
    sys.exit(main())
