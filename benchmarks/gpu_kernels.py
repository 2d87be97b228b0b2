"""GPU timing of the lape_kernels ops at Llama-3.1-8B MLP size (I = 14336, bf16).

For T = 4096 and 16384 tokens: the counting forward (act_mul_count) on the CUDA C++ and Triton
backends against plain ``F.silu(g) * u`` and against the LAPE-style hook count
``(act.float() > 0).sum(0)``; the backward (act_mul_backward) against eager PyTorch; the split
ops used by sparse training (k = 5% of I) against eager gather/scatter. Medians of
``triton.testing.do_bench``; effective GB/s = the bytes each op must move at least (read inputs
once, write outputs once) / time, next to a device-to-device copy measured in the same run.

    python benchmarks/gpu_kernels.py --out reports/gpu_kernels.md [--tokens 4096,16384] [--sweep]

CUDA only (prints a note and exits 0 without a GPU). Runs in well under a minute on an H100
(most of it Triton's first compilation); --sweep also times a few Triton tile configurations.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

I_LLAMA8B = 14336
H_LLAMA8B = 4096  # hidden size: not touched by these ops, listed for the record


def _bench(fn, rep_ms):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")


def _bench_smoke(fn, rep_ms):
    """--smoke on a machine without CUDA: one timed call (checks the script, not the kernels)."""
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _gbps(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the markdown table here too")
    ap.add_argument("--tokens", default="4096,16384", help="comma-separated token counts T")
    ap.add_argument("--rep", type=int, default=60, help="do_bench repetition time per measurement (ms)")
    ap.add_argument("--sweep", action="store_true", help="also time Triton count tile configurations")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes (I=512); without CUDA runs on CPU under TRITON_INTERPRET=1 to test the script")
    args = ap.parse_args(argv)

    cpu_smoke = args.smoke and not torch.cuda.is_available()
    if not torch.cuda.is_available() and not cpu_smoke:
        print("gpu_kernels: no CUDA device; nothing to time.")
        return 0
    if cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

    from lape_kernels import reference as ref
    from lape_kernels import triton_kernels as tk

    try:
        from lape_kernels import ops as lk_ops

        has_cpp = bool(lk_ops._HAS_CUDA_CPP)
    except ImportError as exc:  # extension not built: Triton only, called directly
        print(f"note: lape_kernels.ops unavailable ({exc}); timing the Triton functions directly")
        lk_ops, has_cpp = None, False

    def backend(name):
        """Callable namespace of the ops on backend `name` (through torch.ops when available)."""
        if lk_ops is None:
            return tk
        lk_ops.use_cuda_backend(name)
        return torch.ops.lape_kernels

    t_start = time.time()
    dev = torch.device("cpu" if cpu_smoke else "cuda")
    dt = torch.bfloat16
    I = 512 if args.smoke else I_LLAMA8B
    k = int(0.05 * I)
    rows = []  # (T, group, impl, ms, bytes)
    bench = _bench_smoke if cpu_smoke else _bench

    def add(T, group, impl, fn, nbytes):
        ms = bench(fn, args.rep)
        rows.append((T, group, impl, ms, nbytes))

    impls = (["cuda"] if has_cpp and not cpu_smoke else []) + ["triton"]
    if cpu_smoke:
        lk_ops = None  # torch.ops would run the CPU kernels: call the Triton functions directly
    tokens = [64, 96] if args.smoke else [int(x) for x in args.tokens.split(",")]
    def time_tokens(T):
        """Append the rows for T tokens; False if a backend's counts are wrong."""
        gen = torch.Generator(device=dev).manual_seed(0)
        gate = torch.randn(T, I, device=dev, dtype=dt, generator=gen)
        up = torch.randn(T, I, device=dev, dtype=dt, generator=gen)
        grad = torch.randn(T, I, device=dev, dtype=dt, generator=gen)
        lang = torch.arange(T, device=dev) // 1024 % 4  # 4 languages, runs of 1024 tokens
        sel = torch.randperm(I, device=dev)[:k].sort().values
        grad_sel = torch.randn(T, k, device=dev, dtype=dt, generator=gen)
        e = gate.element_size()
        n = T * I * e

        # reference point: device-to-device copy of one [T, I] tensor (read + write)
        dst = torch.empty_like(gate)
        add(T, "copy", "torch copy_", lambda: dst.copy_(gate), 2 * n)
        dst = None

        # sanity: backends agree with the reference on the counts before anything is timed
        if T == tokens[0]:
            r_oz = ref.act_mul_count(gate, up, "silu", lang, 4)[1]
            for name in impls:
                oz = backend(name).act_mul_count(gate, up, "silu", lang, 4)[1]
                if not torch.equal(oz, r_oz):
                    print(f"ERROR: {name} counts differ from the reference", file=sys.stderr)
                    return False

        # forward + count
        add(T, "act*up (no count)", "eager F.silu(g)*u", lambda: F.silu(gate) * up, 3 * n)
        add(T, "act*up + count (1 lang)", "eager silu*mul + (act.float()>0).sum(0)",
            lambda: (lambda a: (a * up, (a.float() > 0).sum(0)))(F.silu(gate)), 3 * n)
        for name in impls:
            ops = backend(name)
            add(T, "act*up (no count)", f"{name} act_mul", lambda: ops.act_mul(gate, up, "silu"), 3 * n)
            add(T, "act*up + count (1 lang)", f"{name} act_mul_count",
                lambda: ops.act_mul_count(gate, up, "silu", None, 1), 3 * n)
            add(T, "act*up + count (4 langs)", f"{name} act_mul_count",
                lambda: ops.act_mul_count(gate, up, "silu", lang, 4), 3 * n)

        # backward
        add(T, "backward", "eager silu_backward + muls",
            lambda: (torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)), 5 * n)
        for name in impls:
            ops = backend(name)
            add(T, "backward", f"{name} act_mul_backward", lambda: ops.act_mul_backward(grad, gate, up, "silu"), 5 * n)

        # split ops (sparse training), k = 5% of I
        def eager_split():
            h = F.silu(gate) * up
            hs = h[:, sel]
            return h.index_fill_(1, sel, 0.0), hs

        def eager_backward_split():
            dh = grad.index_copy(1, sel, grad_sel)
            gg = torch.ops.aten.silu_backward(dh * up, gate)
            gu = dh * F.silu(gate)
            return gg.index_fill(1, sel, 0.0), gu.index_fill(1, sel, 0.0), gg[:, sel], gu[:, sel]

        add(T, f"split fwd (k={k})", "eager", eager_split, 3 * n)
        add(T, f"split bwd (k={k})", "eager", eager_backward_split, 5 * n)
        for name in impls:
            ops = backend(name)
            add(T, f"split fwd (k={k})", f"{name} act_mul_split",
                lambda: ops.act_mul_split(gate, up, "silu", sel), 3 * n)
            add(T, f"split bwd (k={k})", f"{name} act_mul_backward_split",
                lambda: ops.act_mul_backward_split(grad, grad_sel, gate, up, "silu", sel), 5 * n)

        if args.sweep:
            saved = dict(tk.CONFIGS)
            for cfg in [(16, 128, 8), (32, 128, 8), (16, 256, 8), (8, 256, 4), (32, 64, 4)]:
                tk.CONFIGS["count"] = cfg
                add(T, "act*up + count (4 langs)", f"triton direct, tile {cfg[0]}x{cfg[1]} w{cfg[2]}",
                    lambda: tk.act_mul_count(gate, up, "silu", lang, 4), 3 * n)
            tk.CONFIGS.update(saved)
        return True

    for T in tokens:
        if not time_tokens(T):
            return 1
        if not cpu_smoke:
            torch.cuda.empty_cache()

    if lk_ops is not None and has_cpp:
        lk_ops.use_cuda_backend("cuda")

    copy_gbps = {T: _gbps(b, ms) for T, g, _, ms, b in rows if g == "copy"}
    name = "CPU (--smoke, Triton interpreter)" if cpu_smoke else torch.cuda.get_device_properties(dev).name
    import triton

    lines = [
        f"# lape_kernels GPU ops: Llama-3.1-8B MLP (H={H_LLAMA8B}, I={I}), bf16, silu",
        "",
        f"{name}; torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}. "
        "Median of triton.testing.do_bench. GB/s = minimal bytes moved (inputs read once, outputs "
        "written once) / time; '% copy' relative to a device-to-device copy in the same run.",
        "",
        "| T | op | implementation | ms | GB/s | % copy |",
        "| ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for T, group, impl, ms, nbytes in rows:
        gbps = _gbps(nbytes, ms)
        lines.append(f"| {T} | {group} | {impl} | {ms:.3f} | {gbps:.0f} | {100 * gbps / copy_gbps[T]:.0f}% |")
    lines += ["", f"(total benchmark time {time.time() - t_start:.0f} s)"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
