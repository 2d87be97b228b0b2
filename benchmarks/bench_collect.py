"""LAPE statistics collection: our fused counting vs the LAPE reference's hook approach.

One process, one set of weights shared by three module trees (so every variant reads the same
memory), variants interleaved repeat by repeat (order rotated), medians and spread reported:

  plain      unpatched forward (no counting): the floor
  hooks      unpatched + forward hook on each act_fn doing ``(act.float() > 0).sum(0)`` into a
             per-layer int64 accumulator (the LAPE reference's approach)
  record     patched model inside ``lape_kernels.record`` (fused act_mul_count; also act_sum)
  record+mask  the same with a 2-D attention_mask (padding-aware path)
  patched    patched model, not recording (fused act_mul only)

Sections: ``model`` (decoder body forward, no LM head, under no_grad), ``mlp`` (one layer's MLP
at T tokens) and ``elementwise`` (just act(gate)*up [+ counting] on precomputed gate/up), to
isolate kernel effects.

    python benchmarks/bench_collect.py                                  # CPU, SmolLM2-135M shape
    python benchmarks/bench_collect.py --device cuda --shape llama-3.1-8b --dtype bf16 --out bench_out
    python benchmarks/bench_collect.py --device cuda --backend both     # CUDA C++ vs Triton kernels
    python benchmarks/bench_collect.py --threads 1 --clock process      # a CPU shared with other jobs

On a CPU the MLP GEMMs dominate (SmolLM2 shape, fp32: the reference's counting costs ~2% of a
forward), so ``hooks/record`` is bounded by ``hooks/plain`` however fast the fused kernel is; the
elementwise section shows the kernel's own advantage. On a loaded machine wall-clock timings of
multi-threaded CPU runs are dominated by OpenMP stragglers: use ``--clock process``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lape_kernels  # noqa: E402
from lape_kernels.dtypes import SHORT_DTYPE_NAMES as DTYPES  # noqa: E402
from lape_kernels.testing import HookCounter, lape_count  # noqa: E402

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES),
                   help="model shape (default: smollm2-135m on cpu, llama-3.1-8b on cuda)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default fp32 on cpu, bf16 on cuda")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: all on cpu, 4 on cuda)")
    p.add_argument("--batch", type=int, default=None, help="default 2 on cpu, 8 on cuda")
    p.add_argument("--seq", type=int, default=None, help="default 512 on cpu, 2048 on cuda")
    p.add_argument("--mlp-tokens", type=int, default=2048, help="tokens for the MLP-only sections")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 7 cpu, 20 cuda)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per variant first (default 1 cpu, 3 cuda)")
    p.add_argument("--sections", default="model,mlp,elementwise", help="comma list of model,mlp,elementwise")
    p.add_argument("--backend", default="auto", choices=("auto", "cuda", "triton", "both"),
                   help="CUDA kernels for the patched variants: the C++ CUDA ones, Triton, or both side by side")
    p.add_argument("--inner", type=int, default=None,
                   help="back-to-back calls per timing in the mlp/elementwise sections (default 1 cpu, 10 cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--clock", default="wall", choices=("wall", "process"),
                   help="CPU timing: wall clock, or process CPU time (for machines shared with other jobs)")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="attention implementation")
    p.add_argument("--malloc-mmap-threshold", type=int, default=1 << 30,
                   help="CPU: glibc MALLOC_MMAP_THRESHOLD_ (and TRIM) for this process, set by re-executing "
                        "(default 1 GiB: temporaries come from the heap; 0: leave glibc's dynamic threshold)")
    p.add_argument("--fused-gemm", action=argparse.BooleanOptionalAction, default=None,
                   help="model section: also time record(fused_gemm=True) (default: on CUDA only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for results.md, results.csv, results.png")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.shape = args.shape or ("llama-3.1-8b" if cuda else "smollm2-135m")
    if args.fused_gemm is None:
        args.fused_gemm = cuda
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.batch = args.batch or (8 if cuda else 2)
    args.seq = args.seq or (2048 if cuda else 512)
    args.repeats = args.repeats or (20 if cuda else 7)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.inner = args.inner or (10 if cuda else 1)
    if args.layers is None:
        args.layers = 4 if cuda else SHAPES[args.shape][2]
    for name in ("batch", "seq", "repeats", "layers", "mlp_tokens", "inner"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in ("model", "mlp", "elementwise")]
    if bad:
        p.error(f"unknown sections {bad}")
    return args


# ------------------------------------------------------------------------------------ timing --


class Timer:
    def __init__(self, device: torch.device, clock: str = "wall"):
        self.cuda = device.type == "cuda"
        # process CPU time: robust to other processes competing for the cores (use with
        # --threads 1, or OMP_WAIT_POLICY=PASSIVE so that idle OpenMP threads do not spin)
        self.clock = time.process_time if clock == "process" else time.perf_counter

    def __call__(self, fn: Callable[[], None], inner: int = 1) -> float:
        """Seconds per call of ``fn`` (device-synchronised; mean over ``inner`` back-to-back calls)."""
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        t0 = self.clock()
        for _ in range(inner):
            fn()
        return (self.clock() - t0) / inner


@dataclass
class Variant:
    """What to time, and what to do (untimed) before each timing, e.g. select a kernel backend."""

    fn: Callable[[], None]
    setup: Optional[Callable[[], None]] = None


@dataclass
class Result:
    section: str
    variant: str
    times: List[float] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else math.nan

    def quantile(self, q: float) -> float:
        if not self.times:
            return math.nan
        s = sorted(self.times)
        pos = q * (len(s) - 1)
        lo, hi = int(math.floor(pos)), int(math.ceil(pos))
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def run_interleaved(section: str, variants: Dict[str, Variant], timer: Timer, repeats: int,
                    warmup: int, inner: int = 1) -> Dict[str, Result]:
    """Warm every variant up, then time them round-robin (order rotated each repeat)."""
    results = {name: Result(section, name) for name in variants}
    live = dict(variants)
    for name, v in list(live.items()):
        try:
            if v.setup:
                v.setup()
            for _ in range(warmup):
                v.fn()
        except Exception as exc:  # keep the other variants (a blind GPU run must finish)
            results[name].error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            del live[name]
    names = list(live)
    for r in range(repeats):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            v = live[name]
            try:
                if v.setup:
                    v.setup()
                results[name].times.append(timer(v.fn, inner))
            except Exception as exc:
                results[name].error = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
        names = [n for n in names if results[n].error is None]
        print(f"  [{section}] repeat {r + 1}/{repeats}: " + ", ".join(
            f"{n} {results[n].times[-1] * 1e3:.2f} ms" for n in names if results[n].times), flush=True)
    return results


# ------------------------------------------------------------------------------------ models --


def build_body(args, device: torch.device):
    """A randomly initialised decoder body (``LlamaModel``: no LM head) of the chosen shape."""
    from transformers import LlamaConfig, LlamaModel

    hidden, inter, _, heads, kv, vocab = SHAPES[args.shape]
    vocab = getattr(args, "vocab", None) or vocab
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=args.layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=max(2048, args.seq), hidden_act="silu")
    config._attn_implementation = args.attn
    torch.manual_seed(args.seed)
    with torch.device(device):
        body = LlamaModel(config)
    body = body.to(DTYPES[args.dtype]).eval()
    body.requires_grad_(False)
    # O(1) gates: a mix of signs per neuron like a trained model (HF's 0.02 init gives tiny ones)
    with torch.no_grad():
        for layer in body.layers:
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.normal_(0.0, 1.0 / math.sqrt(lin.weight.shape[1]))
    return body


def shell(body):
    """Another module tree over the very same parameter and buffer tensors (patched independently)."""
    memo = {id(t): t for t in list(body.parameters()) + list(body.buffers())}
    return copy.deepcopy(body, memo)


class BenchRecorder:
    """Minimal recorder (the ``lape_kernels.patching.Recorder`` protocol) for the MLP-only section."""

    fused_gemm = False

    def __init__(self, inter: int, device):
        self.over_zero = torch.zeros(1, inter, dtype=torch.int64, device=device)
        self.act_sum = torch.zeros(1, inter, dtype=torch.float64, device=device)

    def token_lang(self, num_tokens, device):
        return None, 1

    def accumulate(self, layer_index, over_zero, act_sum):
        self.over_zero.add_(over_zero)
        self.act_sum.add_(act_sum)


# ----------------------------------------------------------------------------------- sections --


def backends_for(args, device: torch.device) -> List[str]:
    """Which kernel backends the patched variants run on ([''] on CPU)."""
    if device.type != "cuda":
        return [""]
    from lape_kernels.kernels import ops

    have_cpp = ops._HAS_CUDA_CPP
    if args.backend == "both":
        return (["cuda"] if have_cpp else []) + ["triton"]
    if args.backend == "auto":
        return [ops.current_cuda_backend()]
    if args.backend == "cuda" and not have_cpp:
        print("warning: CUDA C++ kernels not compiled in; using triton", file=sys.stderr)
        return ["triton"]
    return [args.backend]


def backend_setup(backend: str) -> Optional[Callable[[], None]]:
    """Select the CUDA kernel backend before a timing (untimed); None on CPU."""
    if not backend:
        return None
    from lape_kernels.kernels import ops

    def setup():
        if ops.current_cuda_backend() != backend:
            ops.use_cuda_backend(backend)

    return setup


def suffix(backend: str) -> str:
    return f"[{backend}]" if backend else ""


def section_model(args, device, timer, notes: List[str]) -> Dict[str, Result]:
    body_plain = build_body(args, device)
    body_hooks = shell(body_plain)
    body_patched = shell(body_plain)
    body_gemm = shell(body_plain)  # recorded with fused_gemm=True
    counter = HookCounter(body_hooks, with_sum=False)  # the LAPE reference's counting
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, body_plain.config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    mask = torch.ones(args.batch, args.seq, dtype=torch.int64, device=device)
    backends = backends_for(args, device)

    variants: Dict[str, Variant] = {
        "plain": Variant(lambda: body_plain(input_ids=ids)),
        "hooks": Variant(lambda: body_hooks(input_ids=ids)),
    }
    for body in (body_patched, body_gemm):
        lape_kernels.patch(body, chunked_loss=False)
    with torch.no_grad(), lape_kernels.record(body_patched) as stats, \
            lape_kernels.record(body_gemm, fused_gemm=True) as stats_gemm:
        for be in backends:
            variants["record" + suffix(be)] = Variant(lambda: body_patched(input_ids=ids), backend_setup(be))
        variants["record+mask" + suffix(backends[0])] = Variant(
            lambda: body_patched(input_ids=ids, attention_mask=mask), backend_setup(backends[0]))
        if args.fused_gemm:  # record(fused_gemm=True): gate/up GEMMs + count in one kernel
            for be in backends:
                variants["record-gemm" + suffix(be)] = Variant(lambda: body_gemm(input_ids=ids), backend_setup(be))
        results = run_interleaved("model", variants, timer, args.repeats, args.warmup)
    # the recorded counts must be the hook counts (same forwards, same number of them)
    recorded = stats + stats_gemm
    runs_rec = sum(len(r.times) + args.warmup for n, r in results.items() if n.startswith("record") and not r.error)
    # (on CUDA the record-gemm runs count from unrounded fp32 gate/up: a few near-zero signs differ)
    runs_hook = len(results["hooks"].times) + args.warmup
    if runs_rec and runs_hook and not results["hooks"].error:
        a = recorded.over_zero.double() / runs_rec
        b = counter.over_zero[0].cpu().double() / runs_hook
        tokens = args.batch * args.seq
        flips = float((a - b).abs().sum())
        why = ("HF rounds act(gate) before the product, the ops round once: deeper layers' gates differ in the last bit"
               if args.dtype != "fp32" else "last-bit differences of act propagate to deeper layers' gates")
        notes.append("model: per-forward counts, record vs hooks: " + (
            "bit-identical" if flips == 0 else
            f"{flips:.0f} of {tokens * a.numel()} token-neuron signs differ ({flips / (tokens * a.numel()):.1e}; {why})"))
        notes.append(f"model: mean activation probability {float(a.mean()) / tokens:.3f}")
    return results


def section_mlp(args, device, timer, notes: List[str]) -> Dict[str, Result]:
    one = argparse.Namespace(**{**vars(args), "layers": 1, "vocab": 256})  # the MLP is what is timed
    body = build_body(one, device)
    mlp = body.layers[0].mlp
    patched_body = shell(body)
    lape_kernels.patch(patched_body, chunked_loss=False)
    pmlp = patched_body.layers[0].mlp
    inter = body.config.intermediate_size
    hooked_body = shell(body)  # the hooks go on this tree's act_fn only
    HookCounter(hooked_body, with_sum=False)
    hooked = hooked_body.layers[0].mlp
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(1, args.mlp_tokens, body.config.hidden_size, generator=g).to(device, DTYPES[args.dtype])
    rec = BenchRecorder(inter, device)

    def recording():
        pmlp._lape.recorder = rec
        try:
            pmlp(x)
        finally:
            pmlp._lape.recorder = None

    variants: Dict[str, Variant] = {"plain": Variant(lambda: mlp(x)), "hooks": Variant(lambda: hooked(x))}
    for be in backends_for(args, device):
        variants["record" + suffix(be)] = Variant(recording, backend_setup(be))
        variants["patched" + suffix(be)] = Variant(lambda: pmlp(x), backend_setup(be))
    with torch.no_grad():
        return run_interleaved("mlp", variants, timer, args.repeats, args.warmup, inner=args.inner)


def section_elementwise(args, device, timer, notes: List[str]) -> Dict[str, Result]:
    from lape_kernels.kernels import ops

    _, inter, *_ = SHAPES[args.shape]
    g = torch.Generator().manual_seed(args.seed + 2)
    dt = DTYPES[args.dtype]
    gate = torch.randn(args.mlp_tokens, inter, generator=g).to(device, dt)
    up = torch.randn(args.mlp_tokens, inter, generator=g).to(device, dt)
    acc = torch.zeros(1, inter, dtype=torch.int64, device=device)
    acc_oz = torch.zeros(1, inter, dtype=torch.int64, device=device)
    acc_sum = torch.zeros(1, inter, dtype=torch.float64, device=device)

    def hooks():
        a = F.silu(gate)
        acc.add_(lape_count(a, with_sum=False)[0])
        return a * up

    def fused_count():
        out, oz, s = ops.act_mul_count(gate, up, "silu", None, 1)
        acc_oz.add_(oz)
        acc_sum.add_(s)

    variants: Dict[str, Variant] = {"plain": Variant(lambda: F.silu(gate) * up), "hooks": Variant(hooks)}
    for be in backends_for(args, device):
        variants["record" + suffix(be)] = Variant(fused_count, backend_setup(be))
        variants["patched" + suffix(be)] = Variant(lambda: ops.act_mul(gate, up, "silu"), backend_setup(be))
    with torch.no_grad():
        return run_interleaved("elementwise", variants, timer, args.repeats, args.warmup, inner=args.inner)


# ----------------------------------------------------------------------------------- reporting --


def ratio_lines(results: Dict[str, Result]) -> List[str]:
    """Ratios of medians; the bracket is the ratio's range over the interquartile ranges."""
    lines = []
    plain, hooks = results.get("plain"), results.get("hooks")
    for name, r in results.items():
        if not (name.startswith("record") or name.startswith("patched")) or not r.times:
            continue
        if plain is not None and plain.times:
            lines.append(f"{name}/plain = {r.median / plain.median:.3f}x "
                         f"[{r.quantile(.25) / plain.quantile(.75):.3f}, {r.quantile(.75) / plain.quantile(.25):.3f}]")
        if hooks is not None and hooks.times and name.startswith("record"):
            lines.append(f"hooks/{name} = {hooks.median / r.median:.3f}x "
                         f"[{hooks.quantile(.25) / r.quantile(.75):.3f}, {hooks.quantile(.75) / r.quantile(.25):.3f}]")
    return lines


def environment(args, device) -> Dict[str, str]:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()),
    }
    if device.type == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default")
    try:
        from lape_kernels.kernels import ops

        env["cpu_kernels"] = ops.cpu_kernels
        if device.type == "cuda":
            env["gpu"] = torch.cuda.get_device_name(device)
            env["cuda_cpp_kernels"] = str(ops._HAS_CUDA_CPP)
    except Exception as exc:  # pragma: no cover
        env["ops"] = f"unavailable: {exc}"
    return env


def write_outputs(out: Path, args, env, all_results: Dict[str, Dict[str, Result]], notes: List[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    hidden, inter, *_ = SHAPES[args.shape]
    tokens = {"model": args.batch * args.seq, "mlp": args.mlp_tokens, "elementwise": args.mlp_tokens}
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["section", "variant", "device", "dtype", "shape", "layers", "tokens", "repeats", "median_ms",
                    "p25_ms", "p75_ms", "min_ms", "max_ms", "tokens_per_s", "error"])
        for section, results in all_results.items():
            for r in results.values():
                ms = lambda v: f"{v * 1e3:.4f}" if not math.isnan(v) else ""
                tps = f"{tokens[section] / r.median:.1f}" if r.times else ""
                w.writerow([section, r.variant, args.device, args.dtype, args.shape,
                            args.layers if section == "model" else 1, tokens[section], len(r.times), ms(r.median),
                            ms(r.quantile(0.25)), ms(r.quantile(0.75)), ms(r.quantile(0)), ms(r.quantile(1)), tps,
                            r.error or ""])
    lines = [f"# bench_collect: {args.shape} ({hidden}/{inter}), {args.dtype}, {args.device}", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             f"model: {args.layers} layers, batch {args.batch} x seq {args.seq}, decoder body only, no_grad, "
             f"attention {args.attn}; mlp/elementwise: {args.mlp_tokens} tokens. {args.repeats} interleaved repeats "
             f"after {args.warmup} warm-up run(s) each; times in ms"
             + (" of process CPU time" if args.clock == "process" and not args.device.startswith("cuda") else "") + ".", ""]
    for section, results in all_results.items():
        lines += [f"## {section}", "", "| variant | median | p25 | p75 | min | max | tokens/s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in results.values():
            if r.error and not r.times:
                lines.append(f"| {r.variant} | failed: {r.error} | | | | | |")
                continue
            lines.append(f"| {r.variant} | {r.median * 1e3:.2f} | {r.quantile(.25) * 1e3:.2f} | "
                         f"{r.quantile(.75) * 1e3:.2f} | {r.quantile(0) * 1e3:.2f} | {r.quantile(1) * 1e3:.2f} | "
                         f"{tokens[section] / r.median:,.0f} |")
        lines += [""] + [f"- {l}" for l in ratio_lines(results)] + [""]
    if notes:
        lines += ["## notes", ""] + [f"- {n}" for n in notes] + [""]
    (out / "results.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(all_results), figsize=(5 * len(all_results), 4), squeeze=False)
        for ax, (section, results) in zip(axes[0], all_results.items()):
            rs = [r for r in results.values() if r.times]
            med = [r.median * 1e3 for r in rs]
            err = [[m - r.quantile(0) * 1e3 for m, r in zip(med, rs)], [r.quantile(1) * 1e3 - m for m, r in zip(med, rs)]]
            ax.bar([r.variant for r in rs], med, yerr=err, capsize=4, color="#4c72b0")
            ax.set_title(section)
            ax.set_ylabel("ms (median, min-max)")
            ax.tick_params(axis="x", rotation=30)
        fig.suptitle(f"{args.shape} {args.dtype} {args.device}")
        fig.tight_layout()
        fig.savefig(out / "results.png", dpi=120)
        plt.close(fig)
    except Exception as exc:  # the numbers matter more than the picture
        print(f"warning: no chart ({exc})", file=sys.stderr)


_MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _pin_malloc(args) -> None:
    """Re-execute with a fixed glibc mmap threshold (CPU).

    glibc's default threshold is dynamic: whether a freed multi-MB temporary is returned to the OS
    (and page-faulted in again on the next forward) depends on the process's allocation history.
    The hook approach allocates the biggest temporaries (an int64 copy of act > 0 per layer), so
    between otherwise identical runs its cost swung from +2% to +18% of a forward. A fixed, high
    threshold serves every variant from the heap: the cheapest setting for the hooks, i.e. the
    conservative one for our ratios.
    """
    want = str(args.malloc_mmap_threshold)
    if args.device != "cpu" or not args.malloc_mmap_threshold or os.environ.get(_MALLOC_VARS[0]) == want:
        return
    env = dict(os.environ, **{v: want for v in _MALLOC_VARS})
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)


def main(argv=None) -> int:
    args = parse_args(argv)
    if argv is None:
        _pin_malloc(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch has no CUDA device", file=sys.stderr)
        return 2
    from lape_kernels.kernels import ops  # noqa: F401  (fail early, with the build hint, if the extension is missing)

    env = environment(args, device)
    print("environment:", env, flush=True)
    timer = Timer(device, args.clock)
    notes: List[str] = []
    all_results: Dict[str, Dict[str, Result]] = {}
    sections = {"model": section_model, "mlp": section_mlp, "elementwise": section_elementwise}
    for name in args.sections:
        print(f"== {name}", flush=True)
        try:
            all_results[name] = sections[name](args, device, timer, notes)
        except Exception as exc:
            traceback.print_exc()
            notes.append(f"{name}: failed: {type(exc).__name__}: {exc}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    for section, results in all_results.items():
        print(f"[{section}]")
        for r in results.values():
            if r.times:
                print(f"  {r.variant:>22}: median {r.median * 1e3:9.2f} ms  "
                      f"(min {r.quantile(0) * 1e3:.2f}, max {r.quantile(1) * 1e3:.2f}, n={len(r.times)})")
            if r.error:
                print(f"  {r.variant:>22}: FAILED {r.error}")
        for line in ratio_lines(results):
            print("  " + line)
    model = all_results.get("model", {})
    plain, hooks = model.get("plain"), model.get("hooks")
    rec = next((r for n, r in model.items() if n.startswith("record") and "+mask" not in n and r.times), None)
    if plain and hooks and rec and plain.times and hooks.times:
        a, b = rec.median / plain.median, hooks.median / rec.median
        notes.append(f"targets: record/plain = {a:.3f} (<= 1.02: {'met' if a <= 1.02 else 'missed'}), "
                     f"hooks/record = {b:.3f} (>= 1.10: {'met' if b >= 1.10 else 'missed'}); the most counting can "
                     f"save is hooks/plain = {hooks.median / plain.median:.3f}")
    for n in notes:
        print("note:", n)
    if args.out:
        write_outputs(Path(args.out), args, env, all_results, notes)
        print(f"wrote {args.out}/results.md, results.csv, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
