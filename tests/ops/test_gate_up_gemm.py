"""Tests of gate_up_act_mul_count: the gate/up projections fused with act_mul_count.

Backends: the compiled CPU op (torch.ops.lape_kernels.gate_up_act_mul_count: at::mm + the
act_mul_count kernel) and the Triton kernel (lape_kernels/triton_gemm.py, called directly on
CPU tensors under TRITON_INTERPRET=1, on GPU tensors when CUDA is present), both against
lape_kernels/reference.py, whose definition is the module's: gate = x @ w_gate.T and
up = x @ w_up.T in x's dtype (fp32 accumulation, rounded to the dtype as nn.Linear's output is),
then act_mul_count on them (a = act(gate) rounded, out = a * up rounded).

How results are compared (error model):
- The GEMM's summation order is not part of the contract. Any fp32 summation order of H
  products is within gamma_H * sum_k |x_k w_k| of the exact dot (gamma_H = H u / (1 - H u),
  u = 2^-24); the kernel and the reference are each within that, so they differ by at most
  E = 2 gamma_H (|x| @ |w|^T) (`gemm_bound`).
  Rounded to a 16-bit dtype, the two may then round to neighbours: E grows by eps |gate|.
- out: |Δ| <= 1.2 |up| E_g + |act(gate)| E_u + E_g E_u (act is 1.2-Lipschitz for all three
  activations) + COND (1 + |gate|) |up| (kernel vs reference activation ulps, as in
  tests/ops/kernel_tolerance.py) + eps |act(gate)| |up| (the rounded act may be a neighbour) +
  one rounding of the output dtype.
- act_sum: the per-row bound 1.2 E_g + COND (1 + |gate|) + eps |act(gate)| summed over the
  language's rows.
- over_zero, two honest regimes:
  * "exact GEMM" inputs (`dyadic`): x = i/8, w = j/16 with small integers i, j. Every product
    and every partial sum is a multiple of 2^-7 below 2^5, exact in fp32 in any order, so the
    kernel's gate is the reference's bit for bit (E = 0) and counts must be *equal*
    (torch.equal). These inputs also make gate exactly 0 often: the act(0) = 0 edge.
  * Gaussian inputs: a count may differ only where the reference's |gate| <= E_g (a sign the
    GEMM rounding can flip); `check` asserts |Δcount| <= #such rows per (language, column) and
    the tests assert such rows are rare, so the check is not vacuous.
  The CPU op computes gate/up with the very at::mm call of the reference and then the CPU
  kernels: bit-identical to the reference (assert_same) on any input.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from backends import run_gpu_compile_script  # noqa: E402
from inputs import DTYPES, dyadic, gaussian, lang_ids  # noqa: E402
from kernel_tolerance import COND, assert_same  # noqa: E402
from lape_kernels.kernels import ops  # noqa: E402
from lape_kernels.kernels import reference as ref  # noqa: E402
from lape_kernels.kernels import triton_gemm as tg  # noqa: E402

ACTS = ref.ACTIVATIONS
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"
OP = torch.ops.lape_kernels.gate_up_act_mul_count


# -------------------------------------------------------------------------------- checking --


def gemm_bound(x, w):
    """E = 2 gamma_H (|x| @ |w|^T): how far two fp32 GEMMs (any order) may be apart, float64."""
    H = x.shape[1]
    u = 2.0**-24
    gamma = H * u / (1 - H * u)
    return 2 * gamma * (x.double().abs() @ w.double().abs().T)


def check(got, x, wg, wu, activation, token_lang, num_langs, exact_gemm, exact_counts=None):
    """got vs reference.gate_up_act_mul_count under the error model above.

    Returns the number of (row, column) elements whose count is ambiguous (|gate| <= E_g).
    """
    exact_counts = exact_gemm if exact_counts is None else exact_counts
    out, oz, s = got
    r_out, r_oz, r_s = ref.gate_up_act_mul_count(x, wg, wu, activation, token_lang, num_langs)
    T, I = x.shape[0], wg.shape[0]
    assert out.dtype == x.dtype and out.shape == (T, I) and out.device == x.device and out.is_contiguous()
    assert oz.dtype == torch.int64 and oz.shape == (num_langs, I) and oz.device == x.device
    assert s.dtype == torch.float64 and s.shape == (num_langs, I) and s.device == x.device

    xc, wgc, wuc = x.cpu(), wg.cpu(), wu.cpu()
    gate = (xc @ wgc.T).double()  # the reference's projections, rounded to the dtype
    up = (xc @ wuc.T).double()
    a = ref.act(gate.to(x.dtype), activation).double()
    fi = torch.finfo(x.dtype)
    if exact_gemm:
        eg = torch.zeros_like(gate)
        eu = torch.zeros_like(up)
    else:
        eg, eu = gemm_bound(xc, wgc), gemm_bound(xc, wuc)
        if x.dtype != torch.float32:
            eg, eu = eg + fi.eps * gate.abs(), eu + fi.eps * up.abs()
    act_round = fi.eps * a.abs() if x.dtype != torch.float32 else torch.zeros_like(a)

    # out
    o, r = out.cpu().double(), r_out.double()
    delta = (1.2 * up.abs() * eg + a.abs() * eu + 1.2 * eg * eu + COND * (1 + gate.abs()) * up.abs()
             + act_round * up.abs())
    delta = delta + fi.eps * (r.abs() + delta) + fi.tiny
    bad = (o - r).abs() > delta
    assert not bool(bad.any()), (
        f"out: {int(bad.sum())} of {bad.numel()} differ; first {bad.nonzero()[0].tolist()}: "
        f"got {o[bad][0].item()}, expected {r[bad][0].item()}, tolerance {delta[bad][0].item()}"
    )

    # act_sum and over_zero, per language
    lang = torch.zeros(T, dtype=torch.int64) if token_lang is None else token_lang.cpu()
    per_row = 1.2 * eg + COND * (1 + gate.abs()) + act_round
    ambiguous = gate.abs() <= eg
    s_tol = torch.zeros(num_langs, I, dtype=torch.float64)
    amb = torch.zeros(num_langs, I, dtype=torch.int64)
    for k in range(num_langs):
        rows = lang == k
        s_tol[k] = per_row[rows].sum(0) + 1e-12 * a[rows].abs().sum(0)
        amb[k] = ambiguous[rows].sum(0)
    s_c = s.cpu()
    ok = (s_c == r_s) | ((s_c - r_s).abs() <= s_tol)
    assert bool(ok.all()), f"act_sum differs at {(~ok).nonzero()[:5].tolist()}"
    oz_c = oz.cpu()
    if exact_counts:
        assert torch.equal(oz_c, r_oz), f"over_zero differs at {(oz_c != r_oz).nonzero()[:5].tolist()}"
    else:
        diff = (oz_c - r_oz).abs()
        assert bool((diff <= amb).all()), (
            f"over_zero differs beyond the GEMM-rounding ambiguity at {(diff > amb).nonzero()[:5].tolist()}"
        )
    counted = torch.zeros(T, dtype=torch.bool)
    for k in range(num_langs):
        counted |= lang == k
    return int(ambiguous[counted].sum())


def check_cpu(got, x, wg, wu, activation, token_lang, num_langs):
    """The CPU op: bit-identical to the reference (the same at::mm, then the exact CPU kernels)."""
    check(got, x, wg, wu, activation, token_lang, num_langs, exact_gemm=False, exact_counts=True)
    for i, (a, b) in enumerate(zip(got, ref.gate_up_act_mul_count(x, wg, wu, activation, token_lang, num_langs))):
        assert_same(a, b, f"output {i}")


# =============================================================================== CPU op ====


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("with_lang", [False, True], ids=["no_lang", "lang"])
def test_cpu_op_matches_reference(dtype, activation, with_lang):
    """Gaussian inputs: bit-identical to the reference (see module docstring)."""
    T, H, I, L = 45, 72, 83, 3
    x, wg, wu = gaussian(T, H, I, dtype, seed=7)
    lang = lang_ids(T, L, seed=1, mode="runs") if with_lang else None
    got = ops.gate_up_act_mul_count(x, wg, wu, activation, lang, L)
    check_cpu(got, x, wg, wu, activation, lang, L)
    if not with_lang:
        assert torch.all(got[1][1:] == 0) and torch.all(got[2][1:] == 0)
    assert int(got[1].sum()) > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_op_exact_gemm_inputs(dtype):
    x, wg, wu = dyadic(50, 64, 40, dtype, seed=3)
    lang = lang_ids(50, 2, seed=3)
    for activation in ACTS:
        check(ops.gate_up_act_mul_count(x, wg, wu, activation, lang, 2), x, wg, wu, activation, lang, 2, True)


@pytest.mark.parametrize("T,H,I", [(0, 16, 8), (0, 0, 0), (5, 0, 7), (3, 7, 0), (1, 1, 1), (2, 3, 1), (70, 33, 95)])
def test_cpu_op_odd_and_empty_shapes(T, H, I):
    x, wg, wu = gaussian(T, H, I, torch.float32, seed=T + H + I)
    lang = lang_ids(T, 2, seed=2)
    got = OP(x, wg, wu, "gelu", lang, 2)
    check_cpu(got, x, wg, wu, "gelu", lang, 2)
    if H == 0:  # gate = up = 0: act(0) = 0 is never counted, out is 0
        assert torch.all(got[0] == 0) and torch.all(got[1] == 0) and torch.all(got[2] == 0)


def test_cpu_op_views_and_padding_only():
    """Row-strided x, weights as the two halves of a fused [2I, H] weight (Phi-3) and a
    column slice of a wider matrix; all-padding token_lang counts nothing."""
    T, H, I = 21, 40, 30
    gen = torch.Generator().manual_seed(5)
    xx = torch.randn(T, H + 9, generator=gen)[:, 4 : 4 + H]
    fused = torch.randn(2 * I, H, generator=gen) / 4
    wg, wu = fused[:I], fused[I:]
    wide = torch.randn(I, H + 3, generator=gen)[:, :H] / 4
    for a, b in ((wg, wu), (wide, wu)):
        check_cpu(OP(xx, a, b, "silu", None, 1), xx, a, b, "silu", None, 1)
    pad = torch.full((T,), -1, dtype=torch.int64)
    out, oz, s = OP(xx, wg, wu, "silu", pad, 3)
    assert torch.all(oz == 0) and torch.all(s == 0)
    assert torch.equal(out, OP(xx, wg, wu, "silu", None, 1)[0])


def test_python_entry_point_is_the_op():
    x, wg, wu = gaussian(4, 8, 6, torch.float32, seed=0)
    a, b = ops.gate_up_act_mul_count(x, wg, wu, "gelu_tanh", None, 1), OP(x, wg, wu, "gelu_tanh", None, 1)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert "gate_up_act_mul_count" in ops.__all__


def test_gate_and_up_are_rounded_to_the_input_dtype():
    """The definition matters: act_mul_count of the fp32 projections, rounded once (the op's old
    definition), differs from the reference; the op is the module's computation bit for bit."""
    x, wg, wu = gaussian(32, 64, 48, torch.bfloat16, seed=11)
    unrounded = ref.act_mul_count(x.float() @ wg.float().T, x.float() @ wu.float().T, "silu", None, 1)
    with pytest.raises(AssertionError):
        check_cpu((unrounded[0].bfloat16(),) + unrounded[1:], x, wg, wu, "silu", None, 1)
    check_cpu(OP(x, wg, wu, "silu", None, 1), x, wg, wu, "silu", None, 1)
    mlp_out = torch.nn.functional.silu(torch.nn.functional.linear(x, wg)) * torch.nn.functional.linear(x, wu)
    assert_same(OP(x, wg, wu, "silu", None, 1)[0], mlp_out)


# ----------------------------------------------------------------- opcheck, fake, autograd --


def _opcheck_cases():
    x, wg, wu = gaussian(7, 24, 36, torch.float32, seed=0)
    xb, wgb, wub = gaussian(5, 16, 20, torch.bfloat16, seed=1)
    langs = torch.tensor([0, 1, -1, 2, 0, 7, 1])
    return [
        (x, wg, wu, "gelu_tanh", langs, 3),
        (x, wg, wu, "silu", None, 1),
        (xb, wgb, wub, "gelu", None, 2),
        (x[:0], wg, wu, "silu", langs[:0], 2),
    ]


@pytest.mark.parametrize("case", range(4))
def test_opcheck(case):
    torch.library.opcheck(OP.default, _opcheck_cases()[case])


def test_fake_and_meta_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    T, H, I, L = 9, 16, 24, 4
    for dtype in DTYPES:
        x = torch.empty(T, H, dtype=dtype, device="meta")
        w = torch.empty(I, H, dtype=dtype, device="meta")
        lang = torch.empty(T, dtype=torch.int64, device="meta")
        out, oz, s = OP(x, w, w, "silu", lang, L)
        assert out.device.type == "meta"
        assert (out.shape, out.dtype, oz.shape, oz.dtype, s.shape, s.dtype) == (
            (T, I), dtype, (L, I), torch.int64, (L, I), torch.float64)
    with FakeTensorMode():
        x = torch.empty(T, H, dtype=torch.bfloat16)
        w = torch.empty(I, H, dtype=torch.bfloat16)
        out, oz, s = OP(x, w, w, "gelu", None, 2)
        assert (out.shape, out.dtype, oz.shape, s.shape) == ((T, I), torch.bfloat16, (2, I), (2, I))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def fn(x, wg, wu, lang):
        out, oz, s = ops.gate_up_act_mul_count(x, wg, wu, "silu", lang, 2)
        return out * 2, oz, s

    x, wg, wu = gaussian(11, 16, 24, torch.float32, seed=4)
    lang = torch.arange(11) % 3 - 1
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, wg, wu, lang)
    want = fn(x, wg, wu, lang)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_not_differentiable_raises_clearly():
    x, wg, wu = gaussian(6, 8, 10, torch.float32, seed=2)
    wg = wg.clone().requires_grad_(True)
    out, oz, s = ops.gate_up_act_mul_count(x, wg, wu, "silu", None, 1)  # forward works
    assert out.requires_grad and not oz.requires_grad and not s.requires_grad
    with pytest.raises(RuntimeError, match="gate_up_act_mul_count is not differentiable"):
        out.sum().backward()
    with torch.no_grad():
        out = ops.gate_up_act_mul_count(x, wg, wu, "silu", None, 1)[0]
    assert not out.requires_grad


# ============================================================================ Triton kernel ====


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
def test_triton_exact_gemm_inputs(dtype, activation):
    """Counts bit-equal to the reference (exact GEMM), several programs, partial tiles, H % BLOCK_K != 0."""
    T, H, I, L = 37, 40, 50, 3
    x, wg, wu = dyadic(T, H, I, dtype, seed=1, device=DEVICE)
    lang = lang_ids(T, L, seed=2, device=DEVICE)
    check(tg.gate_up_act_mul_count(x, wg, wu, activation, lang, L), x, wg, wu, activation, lang, L, exact_gemm=True)
    check(tg.gate_up_act_mul_count(x, wg, wu, activation, None, 2), x, wg, wu, activation, None, 2, exact_gemm=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_gaussian_inputs(dtype):
    """Realistic inputs: counts may differ only where |gate| is within GEMM rounding of 0 (rare)."""
    T, H, I, L = 64, 48, 96, 2
    x, wg, wu = gaussian(T, H, I, dtype, seed=3, device=DEVICE)
    lang = lang_ids(T, L, seed=4, device=DEVICE)
    for activation in ACTS:
        n_amb = check(tg.gate_up_act_mul_count(x, wg, wu, activation, lang, L), x, wg, wu, activation, lang, L,
                      exact_gemm=False)
        assert n_amb <= 0.01 * T * I, n_amb


@pytest.mark.parametrize("T,H,I", [(0, 16, 16), (5, 16, 0), (4, 0, 9), (1, 1, 1), (3, 17, 5), (70, 64, 96)])
def test_triton_odd_and_empty_shapes(T, H, I):
    x, wg, wu = dyadic(T, H, I, torch.float32, seed=T + I, device=DEVICE)
    lang = lang_ids(T, 2, seed=5, device=DEVICE)
    check(tg.gate_up_act_mul_count(x, wg, wu, "gelu", lang, 2), x, wg, wu, "gelu", lang, 2, exact_gemm=True)


def test_triton_languages_every_row_and_padding_only():
    """Every tile mixes all languages (per-language loop), then a tile of padding only."""
    T, H, I, L = 48, 32, 40, 5
    x, wg, wu = dyadic(T, H, I, torch.float32, seed=6, device=DEVICE)
    lang = (torch.arange(T) % (L + 2) - 1).to(DEVICE)  # -1, 0..4, 5 (not counted)
    check(tg._impl(x, wg, wu, "silu", lang, L, block_t=16, block_i=16, block_k=16, group_t=2),
          x, wg, wu, "silu", lang, L, exact_gemm=True)
    pad = torch.full((T,), -1, dtype=torch.int64, device=DEVICE)
    out, oz, s = tg.gate_up_act_mul_count(x, wg, wu, "silu", pad, 2)
    assert torch.all(oz == 0) and torch.all(s == 0)
    assert torch.equal(out, tg.gate_up_act_mul_count(x, wg, wu, "silu", None, 1)[0])


def test_triton_views():
    """Row-strided x; weights as halves of a fused weight and as a column slice (row stride > H)."""
    T, H, I = 19, 32, 24
    xx, big, _ = dyadic(T, H + 8, 2 * I, torch.bfloat16, seed=8, device=DEVICE)
    x = xx[:, 8:]
    wg, wu = big[:I, :H], big[I:, 3 : 3 + H]
    check(tg.gate_up_act_mul_count(x, wg, wu, "gelu_tanh", None, 1), x, wg, wu, "gelu_tanh", None, 1, exact_gemm=True)


# On a GPU every new tiling is a Triton compilation (~1 s): fewer examples there.
@settings(max_examples=40 if INTERPRETED else 8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(1, 70),
    H=st.integers(16, 64),
    I=st.integers(16, 96),
    block_t=st.sampled_from([16, 32]),
    block_i=st.sampled_from([16, 32, 64]),
    block_k=st.sampled_from([16, 32]),
    group_t=st.sampled_from([1, 2, 3, 8]),
    num_langs=st.integers(1, 4),
    with_lang=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    activation=st.sampled_from(ACTS),
    seed=st.integers(0, 2**16),
)
def test_triton_property(T, H, I, block_t, block_i, block_k, group_t, num_langs, with_lang, dtype, activation, seed):
    """Any shape, tiling, program grouping and language layout: exact counts on exact-GEMM inputs."""
    x, wg, wu = dyadic(T, H, I, dtype, seed=seed, device=DEVICE)
    lang = lang_ids(T, num_langs, seed=seed, device=DEVICE) if with_lang else None
    got = tg._impl(x, wg, wu, activation, lang, num_langs, block_t=block_t, block_i=block_i, block_k=block_k,
                   group_t=group_t)
    check(got, x, wg, wu, activation, lang, num_langs, exact_gemm=True)


# ------------------------------------------------------------- registration as the CUDA kernel --


def test_triton_backend_registers_the_op_for_cuda():
    has = lambda: torch._C._dispatch_has_kernel_for_dispatch_key("lape_kernels::gate_up_act_mul_count", "CUDA")  # noqa: E731
    assert "gate_up_act_mul_count" in ops._OP_NAMES
    before = ops.current_cuda_backend()
    try:
        assert ops.use_cuda_backend("triton") == "triton" and has()
        assert ops._triton_lib is not None
        if ops._HAS_CUDA_CPP:
            assert ops.use_cuda_backend("cuda") == "cuda" and has()  # the C++ composite
        else:
            ops._unregister_triton()
            assert not has()
    finally:
        if before == "triton" and torch.cuda.is_available():
            ops.use_cuda_backend("triton")
        elif before == "cuda":
            ops.use_cuda_backend("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_registered_cuda_op(backend):
    if backend == "cuda" and not ops._HAS_CUDA_CPP:
        pytest.skip("CUDA C++ kernels not compiled in")
    before = ops.current_cuda_backend()
    try:
        ops.use_cuda_backend(backend)
        for dtype in DTYPES:
            x, wg, wu = gaussian(300, 256, 520, dtype, seed=9, device="cuda")
            lang = lang_ids(300, 3, seed=9, device="cuda")
            n_amb = check(OP(x, wg, wu, "silu", lang, 3), x, wg, wu, "silu", lang, 3, exact_gemm=False)
            assert n_amb <= 0.01 * 300 * 520
            x, wg, wu = dyadic(200, 64, 300, dtype, seed=10, device="cuda")
            check(OP(x, wg, wu, "gelu", lang[:200], 3), x, wg, wu, "gelu", lang[:200], 3, exact_gemm=True)
    finally:
        ops.use_cuda_backend(before)


# ------------------------------------------------------------- GPU compilation without a GPU --

COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lape_kernels.kernels import triton_gemm as tg

fn = tg._gemm_count_kernel
PTR = {"x_ptr": "T", "wg_ptr": "T", "wu_ptr": "T", "out_ptr": "T", "lang_ptr": "i64", "oz_ptr": "i64", "sum_ptr": "fp64"}
# What a real launch specialises for 16-byte aligned pointers and multiples of 16 (Llama shapes).
DIV16 = set(PTR) | {"stride_x", "stride_wg", "stride_wu", "T", "I", "H"}

def compile_one(dt, consts, cfg, arch):
    sig = {n: "constexpr" if n in consts else ("*" + (dt if PTR[n] == "T" else PTR[n]) if n in PTR else "i32")
           for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in DIV16}
    bt, bi, bk, gt, nw, ns = cfg
    consts = dict(consts, BLOCK_T=bt, BLOCK_I=bi, BLOCK_K=bk, GROUP_T=gt)
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": nw, "num_stages": ns})
    assert k.asm.get("cubin"), "no cubin"
    return k

n = 0
for dt, act, lang, even in [("bf16", 0, True, True), ("bf16", 1, True, True), ("bf16", 2, False, False),
                            ("fp16", 0, False, True), ("fp32", 2, True, False)]:
    cfg = tg.CONFIGS["fp32" if dt == "fp32" else "16bit"]
    k = compile_one(dt, dict(ACT=act, DT={"fp32": 0, "bf16": 1, "fp16": 2}[dt], PRECISE=True, HAS_LANG=lang,
                             UPCAST=False, FP32_DOT=dt == "fp32", EVEN_K=even), cfg, 90)
    if dt != "fp32":
        # Tensor cores (wgmma on Hopper) and a multi-stage software pipeline.
        assert "wgmma.mma_async" in k.asm["ptx"], "no wgmma"
        bt, bi, bk = cfg[:3]
        one_stage = (bt * bk + 2 * bk * bi) * 2  # bytes of the x, w_gate, w_up tiles
        assert k.metadata.shared >= 2 * one_stage, (k.metadata.shared, one_stage)
    n += 1
k = compile_one("bf16", dict(ACT=0, DT=1, PRECISE=True, HAS_LANG=True, UPCAST=False, FP32_DOT=False, EVEN_K=True),
                tg.CONFIGS["16bit"], 80)
assert "mma.sync" in k.asm["ptx"]
n += 1
print("compiled", n)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel is compiled and run for real")
def test_kernel_compiles_for_hopper_and_ampere():
    """The interpreter does not compile: build the kernel for sm_90 (and sm_80) to cubin."""
    run_gpu_compile_script(COMPILE_SCRIPT, "compiled 6")
