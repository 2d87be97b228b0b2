"""GPU timing of the lape_kernels ops at Llama-3.1-8B MLP size (I = 14336, bf16).

For T = 4096 and 16384 tokens: the counting forward (act_mul_count) on the CUDA C++ and Triton
backends against plain ``F.silu(g) * u`` and against the LAPE-style hook count
``(act.float() > 0).sum(0)``; the backward (act_mul_backward) against eager PyTorch; the split
ops used by sparse training (k = 5% of I) against eager gather/scatter. Medians of
``triton.testing.do_bench``; effective GB/s = the bytes each op must move at least (read inputs
once, write outputs once) / time, next to a device-to-device copy measured in the same run.

First, numerics: every backend's act_mul / act_mul_backward against ATen on the same GPU
(``F.silu(g) * u`` and its autograd, the Hugging Face MLP) and against ATen on the CPU (what the
CPU kernels match bit for bit): the share of elements that differ and the largest difference in
units of the dtype's last place, per dtype and activation (the kernels follow ATen's rounding
points; the GPU's exp/tanh/erf may differ from SLEEF's in the last fp32 bit).

Second table, the stretch goal (GEMM epilogue): gate_up_act_mul_count(x, Wg, Wu) at H = 4096,
T = 4096 (--gemm-tokens) against the unfused path a patched model runs today: cuBLAS
``x @ Wg.T``, ``x @ Wu.T`` (bf16 out) + act_mul_count, and against the cuBLAS GEMMs alone
(the floor for any unfused path). TFLOP/s = 2 GEMMs x 2 T H I / time; ratio = time / time of
the unfused path with the Triton act_mul_count (< 1: the fused kernel is faster).

    python benchmarks/gpu_kernels.py --out reports/gpu_kernels.md [--tokens 4096,16384] [--sweep]

CUDA only (prints a note and exits 0 without a GPU). Runs in well under a minute on an H100
(most of it Triton's first compilation); --sweep also times a few Triton tile configurations
(count: 8-row tiles with 4 warps, num_stages 2; GEMM: num_stages 4). The split ops are timed
with and without the cached slot map (ops.sel_slots: no per-call check of sel, no host sync).
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
    ap.add_argument("--gemm-tokens", default="4096", help="token counts for the GEMM-epilogue table ('' to skip)")
    ap.add_argument("--sweep", action="store_true", help="also time Triton count / GEMM tile configurations")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes (I=512); without CUDA runs on CPU under TRITON_INTERPRET=1 to test the script")
    args = ap.parse_args(argv)

    cpu_smoke = args.smoke and not torch.cuda.is_available()
    if not torch.cuda.is_available() and not cpu_smoke:
        print("gpu_kernels: no CUDA device; nothing to time.")
        return 0
    if cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

    from lape_kernels.kernels import reference as ref
    from lape_kernels.kernels import triton_gemm as tg
    from lape_kernels.kernels import triton_elementwise as tk

    try:
        from lape_kernels.kernels import ops as lk_ops

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
        slots = (lk_ops.sel_slots if lk_ops is not None else tk.sel_slots)(sel, I)
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
            add(T, f"split fwd (k={k})", f"{name} act_mul_split, cached slots",
                lambda: ops.act_mul_split(gate, up, "silu", sel, slots), 3 * n)
            add(T, f"split bwd (k={k})", f"{name} act_mul_backward_split, cached slots",
                lambda: ops.act_mul_backward_split(grad, grad_sel, gate, up, "silu", sel, slots), 5 * n)

        if args.sweep:
            saved = dict(tk.CONFIGS)
            for cfg in [(16, 128, 8, 1), (8, 128, 4, 1), (8, 128, 4, 2), (32, 128, 8, 1), (16, 256, 8, 1),
                        (8, 256, 4, 2), (32, 64, 4, 1)]:
                tk.CONFIGS["count"] = cfg
                add(T, "act*up + count (4 langs)", f"triton direct, tile {cfg[0]}x{cfg[1]} w{cfg[2]} s{cfg[3]}",
                    lambda: tk.act_mul_count(gate, up, "silu", lang, 4), 3 * n)
            tk.CONFIGS.update(saved)
            for cfg in [(16, 128, 8, 1), (16, 128, 4, 2), (8, 128, 4, 2), (32, 128, 8, 2)]:
                tk.CONFIGS["bwd"] = cfg
                add(T, f"split bwd (k={k})", f"triton direct, tile {cfg[0]}x{cfg[1]} w{cfg[2]} s{cfg[3]}",
                    lambda: tk.act_mul_backward_split(grad, grad_sel, gate, up, "silu", sel, slots), 5 * n)
            tk.CONFIGS.update(saved)
        return True

    gemm_rows = []  # (T, impl, ms, flops)
    H = 64 if args.smoke else H_LLAMA8B
    gemm_tokens = [64] if args.smoke else [int(x) for x in args.gemm_tokens.split(",") if x.strip()]
    unfused_name = "cuBLAS x@Wg.T, x@Wu.T + triton act_mul_count"

    def time_gemm(T):
        """gate_up_act_mul_count vs cuBLAS GEMMs (+ act_mul_count); False if counts are wrong."""
        gen = torch.Generator(device=dev).manual_seed(1)
        x = torch.randn(T, H, device=dev, dtype=dt, generator=gen)
        w_gate = (torch.randn(I, H, device=dev, generator=gen) * (2.0 / H**0.5)).to(dt)
        w_up = (torch.randn(I, H, device=dev, generator=gen) / H**0.5).to(dt)
        lang = torch.arange(T, device=dev) // 1024 % 4
        flops = 2 * 2 * T * H * I

        def fused_op(name):
            return tg.gate_up_act_mul_count if lk_ops is None else backend(name).gate_up_act_mul_count

        def count_op(name):
            return backend(name).act_mul_count

        # sanity: fused counts vs act_mul_count on the module's projections (cuBLAS, rounded to
        # bf16); they may differ only where |gate| is within GEMM rounding of 0 (different
        # summation orders), which is rare.
        r_oz = ref.act_mul_count(x @ w_gate.T, x @ w_up.T, "silu", lang, 4)[1]
        g32 = x.float() @ w_gate.float().T
        u = 2.0**-24
        bound = 2 * H * u / (1 - H * u) * (x.float().abs() @ w_gate.float().abs().T)
        ambiguous = int(((g32.abs() <= bound) & (lang >= 0)[:, None]).sum())
        g32 = bound = None
        for name in impls:
            oz = fused_op(name)(x, w_gate, w_up, "silu", lang, 4)[1]
            diff = int((oz - r_oz).abs().sum())
            print(f"gate_up_act_mul_count [{name}]: {diff} count(s) differ from the module's projections "
                  f"({ambiguous} ambiguous elements)")
            if diff > ambiguous:
                print(f"ERROR: {name} gate_up_act_mul_count counts are wrong", file=sys.stderr)
                return False

        def gemm_add(impl, fn):
            gemm_rows.append((T, impl, bench(fn, args.rep), flops))

        gemm_add("cuBLAS x@Wg.T, x@Wu.T only (bf16 out)", lambda: (x @ w_gate.T, x @ w_up.T))
        for name in impls:
            cnt = count_op(name) if lk_ops is not None else tk.act_mul_count
            gemm_add(f"cuBLAS x@Wg.T, x@Wu.T + {name} act_mul_count",
                     lambda: cnt(x @ w_gate.T, x @ w_up.T, "silu", lang, 4))
        for name in impls:
            fused = fused_op(name)
            what = "fused GEMM epilogue" if name == "triton" else "composite: cuBLAS + act_mul_count"
            gemm_add(f"{name} gate_up_act_mul_count ({what})", lambda: fused(x, w_gate, w_up, "silu", lang, 4))
        if args.sweep:
            for cfg in [(128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 64, 64, 8, 8, 4), (128, 64, 64, 8, 4, 4),
                        (64, 128, 64, 8, 4, 4), (128, 128, 32, 8, 8, 4), (256, 64, 64, 8, 8, 3)]:
                bt, bi, bk, gt, nw, ns = cfg
                gemm_add(f"triton direct, tile {bt}x{bi}x{bk} g{gt} w{nw} s{ns}",
                         lambda: tg._impl(x, w_gate, w_up, "silu", lang, 4, block_t=bt, block_i=bi, block_k=bk,
                                          group_t=gt, num_warps=nw, num_stages=ns))
        return True

    numerics = []  # (dtype, act, impl, vs, share differing, share > 1 ulp apart, max |diff| / max |ref|)

    def beyond_one_ulp(a, b):
        """Share of elements more than one unit in the last place (of b's dtype, at |b|) apart."""
        fi = torch.finfo(b.dtype)
        spacing = torch.where(b.abs() < fi.tiny, torch.full_like(b, fi.tiny * fi.eps), b.abs() * fi.eps).double()
        far = (a.double() - b.double()).abs() > spacing
        return float((far & ~(a.isnan() & b.isnan())).float().mean())

    def check_numerics():
        """Each backend vs ATen's MLP (the same GPU and the CPU), forward and backward."""
        acts = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu}
        T = 64 if args.smoke else 2048
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            gen = torch.Generator(device=dev).manual_seed(2)
            gate = (torch.randn(T, I, device=dev, generator=gen) * 3).to(dtype)
            up = torch.randn(T, I, device=dev, generator=gen).to(dtype)
            grad = torch.randn(T, I, device=dev, generator=gen).to(dtype)
            for act, f in acts.items():
                refs = {}
                for where, g, u, go in (("ATen same device", gate, up, grad),
                                        ("ATen CPU", gate.cpu(), up.cpu(), grad.cpu())):
                    gl, ul = g.clone().requires_grad_(True), u.clone().requires_grad_(True)
                    out = f(gl) * ul
                    out.backward(go)
                    refs[where] = (out.detach(), gl.grad, ul.grad)
                for name in impls:
                    ops = backend(name)
                    got = (ops.act_mul(gate, up, act),) + tuple(ops.act_mul_backward(grad, gate, up, act))
                    for where, want in refs.items():
                        for what, a, b in zip(("out", "grad_gate", "grad_up"), got, want):
                            a, b = a.cpu(), b.cpu()
                            diff = ~((a == b) | (a.isnan() & b.isnan()))
                            rel = float((a.double() - b.double()).nan_to_num(0.0).abs().max()
                                        / b.double().nan_to_num(0.0).abs().max().clamp_min(1e-30))
                            numerics.append((str(dtype).replace("torch.", ""), act, f"{name} {what}", where,
                                             float(diff.float().mean()), beyond_one_ulp(a, b), rel))

    check_numerics()
    for T in tokens:
        if not time_tokens(T):
            return 1
        if not cpu_smoke:
            torch.cuda.empty_cache()
    for T in gemm_tokens:
        if not time_gemm(T):
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
    if gemm_rows:
        lines += [
            "",
            f"## gate/up GEMMs + act*up + count (4 langs): x [T, {H}], Wg/Wu [{I}, {H}], bf16, silu",
            "",
            "| T | implementation | ms | TFLOP/s | ratio vs unfused |",
            "| ---: | --- | ---: | ---: | ---: |",
        ]
        base = {T: ms for T, impl, ms, _ in gemm_rows if impl == unfused_name}
        for T, impl, ms, flops in gemm_rows:
            ratio = f"{ms / base[T]:.2f}" if T in base else "-"
            lines.append(f"| {T} | {impl} | {ms:.3f} | {flops / (ms * 1e-3) / 1e12:.0f} | {ratio} |")
    if numerics:
        lines += [
            "",
            "## Numerics: the kernels against ATen's MLP (F.act(g) * u and its autograd)",
            "",
            "| dtype | act | output | against | elements differing | > 1 ulp apart | max diff / max |ref| |",
            "| --- | --- | --- | --- | ---: | ---: | ---: |",
        ]
        for dtype, act, what, where, share, far, worst in numerics:
            lines.append(f"| {dtype} | {act} | {what} | {where} | {100 * share:.3f}% | {100 * far:.3f}% | {worst:.1e} |")
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
