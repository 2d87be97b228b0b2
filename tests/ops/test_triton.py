"""Tests of the Triton kernels (lape_kernels/triton_kernels.py) against lape_kernels/reference.py.

Without CUDA they run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set
below and in conftest.py before triton is imported); with CUDA on GPU tensors, where the
registered torch.ops under the "triton" backend are checked too. Counts are compared exactly,
values to one rounding of the dtype plus the fp32 conditioning of the activations (see TOL).
(The interpreter truncates fp32 -> bf16 instead of rounding to nearest: within one bf16 ulp.)
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lape_kernels.kernels import reference as ref  # noqa: E402
from lape_kernels.kernels import triton_elementwise as tk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACTS = ("silu", "gelu_tanh", "gelu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
from kernel_tolerance import TOL, COND, act_scale, fwd_scale, bwd_scales, check_close, check_count, check_backward, check_split, check_backward_split  # noqa: E402


def gate_up_halves(T, I, dtype, scale=3.0, seed=0):
    """gate/up as the two halves of one [T, 2I] tensor (row stride 2I), like Phi-3's gate_up."""
    g = torch.Generator().manual_seed(seed)
    both = (torch.randn(T, 2 * I, generator=g) * scale).to(dtype).to(DEVICE)
    return both[:, :I], both[:, I:]


def runs_lang(T, num_langs, seed=0):
    """token_lang with runs, mixed stretches, padding (-1) and ids >= num_langs (not counted)."""
    g = torch.Generator().manual_seed(seed)
    lang = torch.empty(T, dtype=torch.int64)
    pos = 0
    while pos < T:
        n = int(torch.randint(1, 20, (1,), generator=g))
        lang[pos : pos + n] = int(torch.randint(-1, num_langs + 1, (1,), generator=g))
        pos += n
    mixed = torch.rand(T, generator=g) < 0.1
    lang[mixed] = torch.randint(-1, num_langs + 1, (int(mixed.sum()),), generator=g)
    return lang.to(DEVICE)


def sorted_sel(I, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(I, generator=g)[:k].sort().values.to(DEVICE)


def randn(*shape, dtype, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def check_all_ops(T, I, dtype, activation, impl_kwargs=None, ks=(0, 7)):
    """Every op (through the *_impl entry points when tile/grid overrides are given) vs reference."""
    kw = impl_kwargs or {}
    gate, up = gate_up_halves(T, I, dtype)
    lang = runs_lang(T, 3)
    if kw:
        out = tk._fwd_impl(gate, up, activation, **kw)[0]
        count = tk._fwd_impl(gate, up, activation, count=True, token_lang=lang, num_langs=3, **kw)
        count = (count[0], count[2], count[3])
    else:
        out = tk.act_mul(gate, up, activation)
        count = tk.act_mul_count(gate, up, activation, lang, 3)
    check_close(out, ref.act_mul(gate, up, activation), fwd_scale(gate, up))
    check_count(count, gate, up, activation, lang, 3)

    grad_out = randn(T, I, dtype=dtype)
    if kw:
        got = tk._bwd_impl(grad_out, gate, up, activation, **kw)[:2]
    else:
        got = tk.act_mul_backward(grad_out, gate, up, activation)
    check_backward(got, grad_out, gate, up, activation)

    for k in ks:
        sel = sorted_sel(I, k, seed=k)
        gos = randn(T, k, dtype=dtype, seed=2)
        if kw:
            o = tk._fwd_impl(gate, up, activation, sel=sel, **kw)
            split = (o[0], o[1])
            g = tk._bwd_impl(grad_out, gate, up, activation, grad_out_sel=gos, sel=sel, **kw)
            bsplit = g[:2] + g[2]
        else:
            split = tk.act_mul_split(gate, up, activation, sel)
            bsplit = tk.act_mul_backward_split(grad_out, gos, gate, up, activation, sel)
        check_split(split, gate, up, activation, sel)
        check_backward_split(bsplit, grad_out, gos, gate, up, activation, sel)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
def test_ops_match_reference(activation, dtype):
    check_all_ops(37, 48, dtype, activation, ks=(0, 11, 48))


@pytest.mark.parametrize("activation", ACTS)
def test_partial_tiles_and_several_row_programs(activation):
    """Small tiles, I and T not multiples of them, several programs per column block."""
    check_all_ops(45, 50, torch.float32, activation, dict(block_t=8, block_i=16, row_progs=3))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy overflows to inf
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
def test_count_special_values(activation, dtype):
    """Signed zeros, tiny, huge and non-finite gates: counts exact, NaN sums propagate."""
    vals = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-3, -1e-3, 5.0, -5.0, 30.0, -30.0, 100.0, -100.0,
                         float("inf"), float("-inf"), float("nan"), 1.0])
    gate = vals.repeat(6, 2).to(dtype).to(DEVICE)
    up = torch.ones_like(gate)
    lang = torch.tensor([0, 0, 1, -1, 1, 0], device=DEVICE)
    check_count(tk.act_mul_count(gate, up, activation, lang, 2), gate, up, activation, lang, 2)


def test_count_languages_changing_every_row():
    """Every tile mixes languages (the per-language reduction path), with several programs."""
    T, I, L = 64, 24, 5
    gate, up = gate_up_halves(T, I, torch.float32, seed=4)
    lang = (torch.arange(T) % (L + 1) - 1).to(DEVICE)
    got = tk._fwd_impl(gate, up, "silu", count=True, token_lang=lang, num_langs=L, block_t=8, block_i=16, row_progs=2)
    check_count((got[0], got[2], got[3]), gate, up, "silu", lang, L)


@pytest.mark.parametrize("run", [8, 16, 24, 5])
@pytest.mark.parametrize("row_progs", [1, 2])
def test_count_language_runs_across_tiles(run, row_progs):
    """Runs of one language per tile, changing between tiles of a program (counter flushes)."""
    T, I, L = 96, 20, 3
    gate, up = gate_up_halves(T, I, torch.float32, seed=run)
    lang = ((torch.arange(T) // run) % (L + 1) - 1).to(DEVICE)  # -1, 0, 1, 2, -1, ...
    got = tk._fwd_impl(gate, up, "gelu", count=True, token_lang=lang, num_langs=L, block_t=8, block_i=16,
                       row_progs=row_progs)
    check_count((got[0], got[2], got[3]), gate, up, "gelu", lang, L)


def test_count_without_token_lang_counts_language_zero():
    gate, up = gate_up_halves(33, 20, torch.bfloat16)
    got = tk.act_mul_count(gate, up, "gelu", None, 3)
    check_count(got, gate, up, "gelu", None, 3)
    assert torch.all(got[1][1:] == 0)


def test_contiguous_inputs_and_views():
    """Contiguous inputs, a non-contiguous grad_out (copied) and row-strided views all work."""
    T, I = 20, 24
    gate = randn(T, I, dtype=torch.float16, seed=5)
    up = randn(T, I, dtype=torch.float16, seed=6)
    check_close(tk.act_mul(gate, up, "silu"), ref.act_mul(gate, up, "silu"), fwd_scale(gate, up))
    grad_out = randn(I, T, dtype=torch.float16, seed=7).t()  # stride(1) != 1
    check_backward(tk.act_mul_backward(grad_out, gate, up, "gelu"), grad_out, gate, up, "gelu")
    big = randn(T, 3 * I + 5, dtype=torch.float32, seed=8)
    g, u = big[:, 5 : 5 + I], big[:, 2 * I + 5 :]
    check_count(tk.act_mul_count(g, u, "gelu_tanh", None, 1), g, u, "gelu_tanh", None, 1)


@pytest.mark.parametrize("T,I", [(0, 16), (5, 0), (0, 0), (1, 1)])
def test_empty_and_degenerate_shapes(T, I):
    gate = randn(T, I, dtype=torch.float32)
    up = randn(T, I, dtype=torch.float32, seed=2)
    check_close(tk.act_mul(gate, up, "silu"), ref.act_mul(gate, up, "silu"))
    check_count(tk.act_mul_count(gate, up, "gelu", None, 2), gate, up, "gelu", None, 2)
    sel = torch.arange(min(I, 1), device=DEVICE)
    check_split(tk.act_mul_split(gate, up, "silu", sel), gate, up, "silu", sel)
    grad_out = randn(T, I, dtype=torch.float32, seed=3)
    gos = randn(T, sel.numel(), dtype=torch.float32, seed=4)
    got = tk.act_mul_backward_split(grad_out, gos, gate, up, "gelu_tanh", sel)
    check_backward_split(got, grad_out, gos, gate, up, "gelu_tanh", sel)


# On a GPU every new tiling is a Triton compilation (~1 s): fewer examples there.
@settings(max_examples=25 if DEVICE == "cpu" else 10, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(0, 40),
    I=st.integers(1, 70),
    block_t=st.sampled_from([8, 16]),
    block_i=st.sampled_from([16, 32, 64]),
    row_progs=st.integers(1, 4),
    num_langs=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
    activation=st.sampled_from(ACTS),
    seed=st.integers(0, 2**16),
)
def test_count_property(T, I, block_t, block_i, row_progs, num_langs, dtype, activation, seed):
    """Any shape, tiling and language layout: counts exact, sums and values within tolerance."""
    gate, up = gate_up_halves(T, I, dtype, seed=seed)
    lang = runs_lang(T, num_langs, seed=seed)
    got = tk._fwd_impl(gate, up, activation, count=True, token_lang=lang, num_langs=num_langs,
                       block_t=block_t, block_i=block_i, row_progs=row_progs)
    check_count((got[0], got[2], got[3]), gate, up, activation, lang, num_langs)


def check_errors(ops, device):
    """Bad arguments raise ValueError naming the argument (`ops`: this module or torch.ops)."""
    gate = torch.randn(4, 8, device=device)
    up = torch.randn(4, 8, device=device)
    T, I = gate.shape
    with pytest.raises(ValueError, match="activation"):
        ops.act_mul(gate, up, "relu")
    with pytest.raises(ValueError, match="gate"):
        ops.act_mul(gate.double(), up, "silu")
    with pytest.raises(ValueError, match="same shape"):
        ops.act_mul(gate, up[:, :-1], "silu")
    with pytest.raises(ValueError, match="same dtype"):
        ops.act_mul(gate, up.half(), "silu")
    with pytest.raises(ValueError, match="2-D"):
        ops.act_mul(gate[0], up[0], "silu")
    with pytest.raises(ValueError, match="contiguous last dimension"):
        ops.act_mul(gate.t().contiguous().t(), up, "silu")
    with pytest.raises(ValueError, match="num_langs"):
        ops.act_mul_count(gate, up, "silu", None, 0)
    with pytest.raises(ValueError, match="token_lang"):
        ops.act_mul_count(gate, up, "silu", torch.zeros(T, dtype=torch.int32, device=device), 1)
    with pytest.raises(ValueError, match="token_lang"):
        ops.act_mul_count(gate, up, "silu", torch.zeros(T + 1, dtype=torch.int64, device=device), 1)
    with pytest.raises(ValueError, match="sel"):
        ops.act_mul_split(gate, up, "silu", torch.tensor([0, 1], dtype=torch.int32, device=device))
    for bad in ([2, 1], [1, 1], [-1, 2], [0, I]):
        with pytest.raises(ValueError, match="sel"):
            ops.act_mul_split(gate, up, "silu", torch.tensor(bad, device=device))
    sel = torch.tensor([1, 3], device=device)
    with pytest.raises(ValueError, match="grad_out_sel"):
        ops.act_mul_backward_split(gate, torch.zeros(T, 3, device=device), gate, up, "silu", sel)
    with pytest.raises(ValueError, match="grad_out_sel"):
        ops.act_mul_backward_split(gate, torch.zeros(T, 2, device=device, dtype=torch.half), gate, up, "silu", sel)
    with pytest.raises(ValueError, match="grad_out"):
        ops.act_mul_backward(gate[:, :-1], gate, up, "silu")
    if device != "cpu":
        with pytest.raises(ValueError, match="same device"):
            ops.act_mul(gate, up.cpu(), "silu")
        with pytest.raises(ValueError, match="token_lang"):
            ops.act_mul_count(gate, up, "silu", torch.zeros(T, dtype=torch.int64), 1)
        with pytest.raises(ValueError, match="grad_out_sel"):
            ops.act_mul_backward_split(gate, torch.zeros(T, 2), gate, up, "silu", sel)


def test_argument_checks():
    check_errors(tk, DEVICE)


# ------------------------------------------------- GPU compilation without a GPU (CPU machines) --

COMPILE_SCRIPT = r"""
import itertools, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lape_kernels.kernels import triton_elementwise as tk

PTR = {"gate_ptr": "T", "up_ptr": "T", "out_ptr": "T", "sel_out_ptr": "T", "slot_ptr": "i32",
       "lang_ptr": "i64", "oz_ptr": "i64", "sum_ptr": "fp64", "go_ptr": "T", "gos_ptr": "T",
       "gg_ptr": "T", "gu_ptr": "T", "ggs_ptr": "T", "gus_ptr": "T", "os_ptr": "T"}

def compile_one(fn, dt, consts, num_warps, arch):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in PTR:
            sig[name] = "*" + (dt if PTR[name] == "T" else PTR[name])
        else:
            sig[name] = "i32"
    src = ASTSource(fn, sig, consts)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    assert k.asm.get("cubin"), "no cubin"

n = 0
for arch in (90, 80):
    for dt, act in itertools.chain(itertools.product(["bf16"], [0, 1, 2]), [("fp16", 0), ("fp32", 2)]):
        for count, split, has_lang in [(False, False, False), (True, False, True), (True, False, False),
                                       (False, True, False)]:
            bt, bi, nw = tk.CONFIGS["count" if count else "fwd"]
            compile_one(tk._fwd_kernel, dt, dict(ACT=act, COUNT=count, SPLIT=split, HAS_LANG=has_lang,
                                                 BLOCK_T=bt, BLOCK_I=bi), nw, arch)
            n += 1
        for split in (False, True):
            bt, bi, nw = tk.CONFIGS["bwd"]
            compile_one(tk._bwd_kernel, dt, dict(ACT=act, SPLIT=split, BLOCK_T=bt, BLOCK_I=bi), nw, arch)
            n += 1
        if arch == 80:
            break  # one dtype/activation is enough to check the older target
print("compiled", n)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are compiled and run for real")
def test_kernels_compile_for_hopper_and_ampere():
    """The interpreter does not compile: build every kernel variant for sm_90 (and sm_80) to cubin."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "compiled 36" in res.stdout


# ------------------------------------------------------------------ registered torch.ops on CUDA --

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def triton_backend():
    """torch.ops.lape_kernels.* on the Triton kernels; restores the previous backend."""
    ops = pytest.importorskip("lape_kernels.kernels.ops")
    previous = ops.current_cuda_backend()
    assert ops.use_cuda_backend("triton") == "triton"
    yield torch.ops.lape_kernels
    ops.use_cuda_backend(previous)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_registered_ops_use_triton(triton_backend, dtype):
    ops = triton_backend
    T, I = 50, 64
    gate, up = gate_up_halves(T, I, dtype)
    lang = runs_lang(T, 2)
    for activation in ACTS:
        check_close(ops.act_mul(gate, up, activation), ref.act_mul(gate, up, activation), fwd_scale(gate, up))
        check_count(ops.act_mul_count(gate, up, activation, lang, 2), gate, up, activation, lang, 2)
        sel = sorted_sel(I, 9)
        grad_out = randn(T, I, dtype=dtype)
        gos = randn(T, 9, dtype=dtype)
        check_backward(ops.act_mul_backward(grad_out, gate, up, activation), grad_out, gate, up, activation)
        check_split(ops.act_mul_split(gate, up, activation, sel), gate, up, activation, sel)
        check_backward_split(ops.act_mul_backward_split(grad_out, gos, gate, up, activation, sel),
                             grad_out, gos, gate, up, activation, sel)
    check_errors(ops, "cuda")


@cuda_only
def test_triton_count_exact_at_llama_8b_size():
    """T=4096 x I=14336 bf16 with per-token languages: Triton counts bit-exact."""
    T, I = 4096, 14336
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate = torch.randn(T, I, device="cuda", generator=gen, dtype=torch.bfloat16)
    up = torch.randn(T, I, device="cuda", generator=gen, dtype=torch.bfloat16)
    lang = torch.arange(T, device="cuda") // 300 % 5 - 1
    check_count(tk.act_mul_count(gate, up, "silu", lang, 4), gate, up, "silu", lang, 4)
