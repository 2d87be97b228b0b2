"""Scale-out of ``lape-kernels collect``: one process against ``torchrun --nproc_per_node N``.

The commands are run exactly as a user runs them, on a random-init model saved to disk and a
synthetic corpus (built here, offline), each into a fresh output, the variants interleaved
repeat by repeat (order rotated). Per run we record:

  loop tok/s  tokens / the collect loop's own seconds (``index.json``: counting, the all-reduce at
              every save point and rank 0's saves; not the start-up)
  loop CPU s  each process's CPU seconds in that loop (``cpu_seconds_per_rank``): summed over the
              processes it stays near the one-process figure when the ranks share the work (a
              duplicated job doubles it); tokens per CPU second of the busiest process is the
              speed-up the processes would get with a core each, whatever else runs on the machine
  command     the whole command's wall and CPU seconds (Python and torch start-up of every
              process and of torchrun, model load, packing included)

CPU (default): 1 process vs ``--procs`` processes (default 2), ``--threads`` threads each
(default 1): the data-parallel speed-up, target >= 1.6x for 2 processes. It needs the cores:
on a machine whose cores are busy with other jobs (see the load average in the report) the
processes time-share and the wall-clock ratio falls towards 1 while the CPU seconds still show
the split.

CUDA (``--device cuda``): one GPU with and without the distributed path (a plain process vs
``torchrun --nproc_per_node 1``: NCCL process group, rank-0 decisions; overhead target <= 2%),
and ``torchrun --nproc_per_node G`` when the node has G > 1 GPUs.

    python benchmarks/bench_scale.py                                   # CPU, 1 vs 2 processes
    python benchmarks/bench_scale.py --procs 4 --tokens 65536 --repeats 5
    python benchmarks/bench_scale.py --device cuda --out out/gpu/scale # a GPU node
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES = {
    # name: hidden, intermediate, layers, heads, kv_heads
    "small": (256, 1024, 4, 4, 2),
    "smollm2-135m": (576, 1536, 30, 9, 3),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8),
}
LANGS = ("aa", "bb")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--procs", type=int, default=None, help="processes of the parallel run (CPU; default 2)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (OMP_NUM_THREADS; default 1)")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES),
                   help="model shape (default: small on cpu, llama-3.1-8b on cuda)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's on cpu, 4 on cuda)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per language (default 16384 cpu, 262144 cuda)")
    p.add_argument("--seq-len", type=int, default=None, help="default 128 cpu, 2048 cuda")
    p.add_argument("--batch-size", type=int, default=None, help="default 4 cpu, 8 cuda")
    p.add_argument("--save-every", type=int, default=8, help="batches per save chunk (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first (default 1)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run before it counts as failed")
    p.add_argument("--out", default="reports/bench_scale", help="report folder (results.md, results.csv)")
    p.add_argument("--workdir", default=None, help="where the model, corpus and outputs go (default: a temp dir)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.shape = args.shape or ("llama-3.1-8b" if cuda else "small")
    args.layers = args.layers or (4 if cuda else SHAPES[args.shape][2])
    args.tokens = args.tokens or (262144 if cuda else 16384)
    args.seq_len = args.seq_len or (2048 if cuda else 128)
    args.batch_size = args.batch_size or (8 if cuda else 4)
    args.procs = args.procs or 2
    for name in ("procs", "threads", "layers", "tokens", "batch_size", "save_every", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seq_len < 2:
        p.error("--seq-len must be >= 2")
    return args


# ------------------------------------------------------------------------------------ setup --


def build_setup(root: Path, args) -> Dict[str, Path]:
    """A random-init llama of ``--shape`` saved with its char tokenizer, and a corpus with about
    ``--tokens`` tokens per language (the toy alphabets: languages use different tokens)."""
    import torch

    from lape_kernels.experiment.toy import make_toy_setup
    from lape_kernels.testing import tiny_model

    lines = args.tokens // 75 + 50  # toy lines are 40..120 characters, one token each
    model_dir, corpus = make_toy_setup(str(root), lines=lines, alphabets=_alphabets())
    hidden, inter, _, heads, kv = SHAPES[args.shape]
    model = tiny_model("llama", num_layers=args.layers, intermediate=inter, hidden_size=hidden,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
                       max_position_embeddings=max(256, args.seq_len), varied_signs=False,
                       dtype=torch.bfloat16 if args.device == "cuda" else torch.float32)
    shutil.rmtree(model_dir)
    model.save_pretrained(model_dir)
    from lape_kernels.testing import tiny_tokenizer

    tiny_tokenizer().save_pretrained(model_dir)
    return {"model": Path(model_dir), "corpus": Path(corpus)}


def _alphabets() -> Dict[str, str]:
    from lape_kernels.experiment.toy import TOY_ALPHABETS

    return {k: TOY_ALPHABETS[k] for k in LANGS}


# ------------------------------------------------------------------------------------ running --


def launcher(nproc: Optional[int]) -> List[str]:
    """``python -m lape_kernels.cli`` (nproc None) or ``torchrun --standalone --nproc_per_node N``."""
    if nproc is None:
        return [sys.executable, "-m", "lape_kernels.cli"]
    torchrun = Path(sys.executable).parent / "torchrun"
    base = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*base, "--standalone", "--nproc_per_node", str(nproc), "-m", "lape_kernels.cli"]


def variants(args) -> Dict[str, Optional[int]]:
    """name -> processes under torchrun (None: a plain process)."""
    if args.device == "cpu":
        return {"1 process": None, f"{args.procs} processes": args.procs}
    import torch

    found = {"1 GPU, plain": None, "1 GPU, torchrun": 1}
    if torch.cuda.device_count() > 1:
        found[f"{torch.cuda.device_count()} GPUs, torchrun"] = torch.cuda.device_count()
    return found


def run_once(cmd: List[str], setup: Dict[str, Path], out: Path, args) -> Dict[str, float]:
    if out.exists():
        shutil.rmtree(out)
    argv = [*cmd, "collect", "--model", str(setup["model"]), "--data", str(setup["corpus"]), "--languages", *LANGS,
            "--tokens", str(args.tokens), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
            "--save-every", str(args.save_every), "--device", args.device, "-o", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=args.timeout)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"exit {p.returncode}: {p.stderr.strip()[-1500:]}")
    rec = json.loads((out / "index.json").read_text())["collect"]
    tokens = sum(rec["tokens"].values())
    per_rank = rec.get("cpu_seconds_per_rank") or [float("nan")]
    return {"wall_s": wall, "loop_s": rec["seconds"], "loop_tok_s": tokens / rec["seconds"], "tokens": tokens,
            "loop_cpu_s": sum(per_rank), "busiest_cpu_s": max(per_rank), "cpu_tok_s": tokens / max(per_rank),
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "world_size": rec.get("world_size", 1)}


def check_same(outs: Dict[str, Path]) -> str:
    """The parallel runs wrote the one-process statistics (over_zero equal, n_tokens equal)."""
    import torch

    from lape_kernels import StatsByLanguage

    loaded = {name: StatsByLanguage.load(p) for name, p in outs.items()}
    ref_name, ref = next(iter(loaded.items()))
    lines = []
    for name, got in list(loaded.items())[1:]:
        same = all(torch.equal(got[l].over_zero, ref[l].over_zero) and got[l].n_tokens == ref[l].n_tokens
                   for l in LANGS)
        diff = max(float((got[l].act_sum - ref[l].act_sum).abs().max()) for l in LANGS)
        lines.append(f"{name} vs {ref_name}: over_zero and n_tokens {'equal' if same else 'DIFFER'}, "
                     f"act_sum max |diff| {diff:.3g}")
    return "; ".join(lines)


def median(xs: List[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("bench_scale: --device cuda but this machine has no CUDA device; nothing to measure", file=sys.stderr)
            return 2
    load_before = os.getloadavg()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"building the model ({args.shape}, {args.layers} layers) and corpus in {work}", flush=True)
        setup = build_setup(work / "setup", args)
        vs = variants(args)
        results: Dict[str, List[Dict[str, float]]] = {name: [] for name in vs}
        errors: Dict[str, str] = {}
        last_out: Dict[str, Path] = {}
        names = list(vs)
        for r in range(-args.warmup, args.repeats):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                if name in errors:
                    continue
                out = work / ("out-" + "".join(c if c.isalnum() else "_" for c in name))
                try:
                    m = run_once(launcher(vs[name]), setup, out, args)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    errors[name] = " ".join(str(exc).split())
                    print(f"  {name}: FAILED {errors[name]}", flush=True)
                    continue
                last_out[name] = out
                tag = "warm-up" if r < 0 else f"repeat {r + 1}/{args.repeats}"
                print(f"  [{tag}] {name}: loop {m['loop_tok_s']:,.0f} tok/s, wall {m['wall_s']:.1f} s, "
                      f"cpu {m['cpu_s']:.1f} s", flush=True)
                if r >= 0:
                    results[name].append(m)
        same = check_same({n: last_out[n] for n in names if n in last_out}) if len(last_out) > 1 else "not compared"
        load_after = os.getloadavg()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    report(args, results, errors, same, load_before, load_after)
    return 0 if not errors else 1


def report(args, results, errors, same, load_before, load_after) -> None:
    import torch

    names = [n for n in results if results[n]]
    base = names[0] if names else None
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "cores (affinity)": str(len(os.sched_getaffinity(0))),
           "load average before/after": f"{load_before[0]:.1f} / {load_after[0]:.1f}"}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    rows = []
    for name in names:
        rs = results[name]
        rows.append({"variant": name, "device": args.device, "threads_per_process": args.threads,
                     "runs": len(rs), "world_size": rs[0]["world_size"], "tokens": rs[0]["tokens"],
                     "loop_tok_s": median([x["loop_tok_s"] for x in rs]), "wall_s": median([x["wall_s"] for x in rs]),
                     "cpu_s": median([x["cpu_s"] for x in rs]), "loop_cpu_s": median([x["loop_cpu_s"] for x in rs]),
                     "busiest_cpu_s": median([x["busiest_cpu_s"] for x in rs]),
                     "cpu_tok_s": median([x["cpu_tok_s"] for x in rs]),
                     "loop_tok_s_min": min(x["loop_tok_s"] for x in rs),
                     "loop_tok_s_max": max(x["loop_tok_s"] for x in rs)})
    by = {r["variant"]: r for r in rows}
    lines_ratio = []
    for r in rows[1:]:
        b = by[base]
        lines_ratio.append(f"{r['variant']} / {base}: loop tokens/s {r['loop_tok_s'] / b['loop_tok_s']:.2f}x "
                           f"[{r['loop_tok_s_min'] / b['loop_tok_s_max']:.2f}, {r['loop_tok_s_max'] / b['loop_tok_s_min']:.2f}]"
                           f"; per busiest-process CPU second {r['cpu_tok_s'] / b['cpu_tok_s']:.2f}x; loop CPU seconds "
                           f"(all processes) {r['loop_cpu_s'] / b['loop_cpu_s']:.2f}x; whole command wall "
                           f"{b['wall_s'] / r['wall_s']:.2f}x faster, CPU {r['cpu_s'] / b['cpu_s']:.2f}x")
    if args.device == "cpu" and len(rows) > 1:
        x = rows[1]["loop_tok_s"] / rows[0]["loop_tok_s"]
        goal = 0.8 * args.procs
        lines_ratio.append(f"target: {args.procs} processes >= {goal:.1f}x one process: "
                           f"{'met' if x >= goal else 'missed'} ({x:.2f}x)")
    if args.device == "cuda" and "1 GPU, torchrun" in by and base:
        o = by[base]["loop_tok_s"] / by["1 GPU, torchrun"]["loop_tok_s"] - 1
        lines_ratio.append(f"distributed-path overhead on 1 GPU: {100 * o:+.1f}% (target <= 2%: "
                           f"{'met' if o <= 0.02 else 'missed'})")
    hidden, inter, *_ = SHAPES[args.shape]
    md = [f"# bench_scale: collect, {args.device}", "",
          "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
          f"Model: random-init llama {args.shape} ({hidden}/{inter}), {args.layers} layers; {len(LANGS)} languages x "
          f"{args.tokens} tokens, seq {args.seq_len}, batch {args.batch_size}, save every {args.save_every} batches; "
          f"{args.threads} thread(s) per process; {args.repeats} interleaved runs per variant after {args.warmup} "
          f"warm-up; medians (loop tok/s: min-max).", "",
          "| variant | world size | loop tok/s | min | max | loop CPU s (all) | busiest process CPU s | "
          "tok per busiest CPU s | command wall s | command CPU s |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        md.append(f"| {r['variant']} | {r['world_size']} | {r['loop_tok_s']:,.0f} | {r['loop_tok_s_min']:,.0f} | "
                  f"{r['loop_tok_s_max']:,.0f} | {r['loop_cpu_s']:.2f} | {r['busiest_cpu_s']:.2f} | "
                  f"{r['cpu_tok_s']:,.0f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} |")
    md += [""] + [f"- {l}" for l in lines_ratio] + [f"- statistics: {same}"]
    md += [f"- {name}: failed: {e}" for name, e in errors.items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(md) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["variant"])
        w.writeheader()
        w.writerows(rows)
    print()
    print("\n".join(md))
    print(f"\nwrote {out}/results.md, results.csv")


if __name__ == "__main__":
    sys.exit(main())
