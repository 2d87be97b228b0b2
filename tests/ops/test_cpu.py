"""The compiled CPU ops beyond the test matrix (tests/ops/test_matrix.py): bit-identical to what
ATen computes for the Hugging Face MLP (``F.silu(g) * u`` and its autograd) for every 16-bit
input value, at every thread count and layout (ATen's scalar tails), in every per-ISA build;
tiles of the counting kernel, determinism, autograd, torch.compile, opcheck, the import and the
CUDA backend switch.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from inputs import DTYPES, gate_up, randn
from kernel_tolerance import assert_same, check_op
from backends import make_backend
from lape_kernels.kernels import ops
from lape_kernels.kernels import reference as ref

ACTS = ref.ACTIVATIONS
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU = make_backend("cpu")


def make_pair(T, I, dtype, layout, seed, scale=3.0):
    return gate_up(T, I, dtype, {"chunk": "halves"}.get(layout, layout), seed=seed, scale=scale)


def rand_like(t, seed, scale=1.0):
    return randn(*t.shape, dtype=t.dtype, seed=seed, scale=scale)


def check_count(result, gate, up, activation, token_lang, num_langs):
    check_op(CPU, "act_mul_count", result, gate, up, activation, token_lang, num_langs)


# ---------------------------------------------------------------------- counting kernel --


def test_count_many_languages_tiles_and_threads():
    """Shapes that use several column tiles and row tiles, and languages that never occur."""
    T, I = 300, 4096 + 3 * 32 + 5
    gate, up = make_pair(T, I, torch.bfloat16, "chunk", 7)
    token_lang = torch.randint(-1, 9, (T,), generator=torch.Generator().manual_seed(3))
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            check_count(ops.act_mul_count(gate, up, "gelu_tanh", token_lang, 40), gate, up, "gelu_tanh", token_lang, 40)
        finally:
            torch.set_num_threads(previous)


def _hf_mlp(gate, up, act, grad_out):
    """What the Hugging Face MLP computes through ATen: out = act_fn(gate) * up, and autograd's
    (grad_gate, grad_up) for grad_out, with gate/up leaves of the same layout."""
    f = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu}[act]
    g = gate.detach().clone() if gate.is_contiguous() else gate.detach()
    leaves = (g.requires_grad_(True), up.detach().clone().requires_grad_(True))
    if not gate.is_contiguous():  # keep the strided layout: halves of one fused leaf
        both = torch.cat([gate, up], 1).detach().requires_grad_(True)
        leaves = (both,)
        g, u = both[:, : gate.shape[1]], both[:, gate.shape[1]:]
    else:
        g, u = leaves
    out = f(g) * u
    out.backward(grad_out)
    if len(leaves) == 1:
        grad = leaves[0].grad
        return out.detach(), grad[:, : gate.shape[1]], grad[:, gate.shape[1]:]
    return out.detach(), leaves[0].grad, leaves[1].grad


def _check_hf_exact(gate, up, act, seed=0):
    grad_out = randn(*gate.shape, dtype=gate.dtype, seed=seed + 7)
    out, grad_gate, grad_up = _hf_mlp(gate, up, act, grad_out)
    assert_same(ops.act_mul(gate, up, act), out, "act_mul")
    got = ops.act_mul_count(gate, up, act, None, 1)
    assert_same(got[0], out, "act_mul_count")
    a = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu}[act](gate)
    assert torch.equal(got[1][0], (a > 0).sum(0))
    for name, x, y in zip(("grad_gate", "grad_up"), ops.act_mul_backward(grad_out, gate, up, act), (grad_gate, grad_up)):
        if not gate.is_contiguous():
            x = x + 0.0  # autograd sums the two halves' gradients into the fused leaf: -0 + 0 = +0
        assert_same(x, y, name)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_every_16bit_gate_value(act, dtype):
    """All 65536 bit patterns as gate (NaN, +-inf, subnormals included), contiguous and as the
    halves of a fused projection: forward, counts and backward bit-identical to ATen's."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256)
    up = randn(256, 256, dtype=dtype, seed=1)
    _check_hf_exact(bits, up, act)
    both = torch.cat([bits, up], 1)
    _check_hf_exact(both[:, :256], both[:, 256:], act)


SHAPES = [(1, 100), (3, 100), (7, 13), (5, 2), (300, 333), (64, 1000), (257, 130), (2, 40000), (9, 4099)]
# Above the grains (32768 elements; F.gelu: 16384, then numel / threads): split over threads.
PARALLEL_SHAPES = [(3, 100), (2, 40000), (9, 4099), (33, 1001)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_aten_scalar_tails_threads_and_layouts(act, dtype, threads):
    """Sizes with remainders in ATen's vector steps, per thread range (several threads, grains
    of F.silu and of F.gelu above 16384 elements) and per row (strided gate): every element
    takes the function ATen takes for it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for T, I in SHAPES if threads == 1 else PARALLEL_SHAPES:
            for layout in ("contiguous", "halves", "padded"):
                gate, up = gate_up(T, I, dtype, layout, seed=T * I, scale=4.0)
                _check_hf_exact(gate, up, act, seed=T)
    finally:
        torch.set_num_threads(previous)


def test_act_sum_is_fp64_accurate_under_batch_splitting():
    """Sums are accumulated in fp64: splitting the tokens changes them only at fp64 rounding."""
    gate, up = make_pair(301, 96, torch.bfloat16, "contiguous", 13)
    langs = torch.randint(-1, 2, (301,), generator=torch.Generator().manual_seed(2))
    _, oz, s = ops.act_mul_count(gate, up, "silu", langs, 2)
    parts = [ops.act_mul_count(gate[a:b], up[a:b], "silu", langs[a:b], 2) for a, b in ((0, 7), (7, 150), (150, 301))]
    assert torch.equal(oz, sum(p[1] for p in parts))
    torch.testing.assert_close(s, sum(p[2] for p in parts), rtol=1e-12, atol=1e-12)


def test_count_is_deterministic():
    gate, up = make_pair(257, 1536, torch.float32, "contiguous", 11)
    token_lang = torch.randint(0, 3, (257,), generator=torch.Generator().manual_seed(5))
    a = ops.act_mul_count(gate, up, "silu", token_lang, 3)
    b = ops.act_mul_count(gate, up, "silu", token_lang, 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_count_is_the_lape_statistic():
    """over_zero equals the LAPE hook's (act > 0).sum over each language's tokens."""
    gate, up = make_pair(64, 200, torch.float32, "contiguous", 2)
    langs = torch.tensor([0] * 20 + [1] * 30 + [-1] * 14)
    _, oz, s = ops.act_mul_count(gate, up, "silu", langs, 2)
    a = torch.nn.functional.silu(gate)
    assert torch.equal(oz[0], (a[:20] > 0).sum(0)) and torch.equal(oz[1], (a[20:50] > 0).sum(0))
    assert torch.allclose(s[1], a[20:50].double().sum(0), rtol=1e-5, atol=1e-5)


def test_python_entry_points_are_the_ops():
    gate, up = make_pair(4, 9, torch.float32, "contiguous", 1)
    assert torch.equal(ops.act_mul(gate, up, "gelu"), torch.ops.lape_kernels.act_mul(gate, up, "gelu"))
    assert ops.cpu_kernels in ("avx512", "avx2", "default")


# ---------------------------------------------------------------------------------- autograd --


def _grads(fn, *inputs):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.float() * rand_like(o, 100 + i).float()).sum() for i, o in enumerate(outs) if o.dtype.is_floating_point)
    loss.backward()
    return [x.grad for x in inputs]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd_act_mul_and_count(act, dtype):
    """Gradients through the registered autograd: autograd of the reference, bit for bit."""
    gate, up = make_pair(13, 70, dtype, "contiguous", 4)
    want = _grads(lambda g, u: ref.act_mul(g, u, act), gate, up)
    for fn in (lambda g, u: ops.act_mul(g, u, act),
               lambda g, u: ops.act_mul_count(g, u, act, torch.tensor([0, 1, -1] * 4 + [1]), 2)[0]):
        for a, b in zip(_grads(fn, gate, up), want):
            assert_same(a, b)


def test_autograd_count_outputs_are_not_differentiable():
    gate, up = make_pair(3, 8, torch.float32, "contiguous", 0)
    gate.requires_grad_(True)
    out, oz, s = ops.act_mul_count(gate, up, "silu", None, 1)
    assert out.requires_grad and not oz.requires_grad and not s.requires_grad


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd_act_mul_split(act, dtype):
    gate, up = make_pair(11, 45, dtype, "contiguous", 9)
    sel = torch.tensor([0, 3, 17, 44])
    want = _grads(lambda g, u: ref.act_mul_split(g, u, act, sel), gate, up)
    for a, b in zip(_grads(lambda g, u: ops.act_mul_split(g, u, act, sel), gate, up), want):
        assert_same(a, b)


def test_autograd_through_fused_halves():
    """Phi-3 style: gate/up are views of one tensor; its gradient is assembled from both."""
    x = (torch.randn(6, 2 * 40, generator=torch.Generator().manual_seed(1)) * 2).requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    w = torch.randn(6, 40)
    (ops.act_mul(*x.chunk(2, -1), "gelu_tanh") * w).sum().backward()
    (ref.act_mul(*xr.chunk(2, -1), "gelu_tanh") * w).sum().backward()
    assert_same(x.grad, xr.grad)


# -------------------------------------------------------------------- opcheck / torch.compile --


def _opcheck_cases():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(7, 36, generator=gen)
    u = torch.randn(7, 36, generator=gen)
    go = torch.randn(7, 36, generator=gen)
    sel = torch.tensor([2, 5, 35])
    gos = torch.randn(7, 3, generator=gen)
    langs = torch.tensor([0, 1, -1, 2, 0, 7, 1])
    gr = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    L = torch.ops.lape_kernels
    return [
        (L.act_mul.default, (g, u, "silu")),
        (L.act_mul.default, (gr(g), gr(u), "gelu")),
        (L.act_mul_count.default, (g, u, "gelu_tanh", langs, 3)),
        (L.act_mul_count.default, (gr(g), gr(u), "silu", None, 1)),
        (L.act_mul_backward.default, (go, g, u, "gelu_tanh")),
        (L.act_mul_split.default, (g, u, "gelu", sel)),
        (L.act_mul_split.default, (gr(g), gr(u), "silu", sel)),
        (L.act_mul_backward_split.default, (go, gos, g, u, "silu", sel)),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def _compiled_fn(gate, up, token_lang):
    h = ops.act_mul(gate, up, "silu")
    h2, oz, s = ops.act_mul_count(gate, up, "gelu_tanh", token_lang, 2)
    return (h * 2 + h2).sum(), oz, s


def test_torch_compile_fullgraph_aot_eager():
    torch._dynamo.reset()
    fn = torch.compile(_compiled_fn, fullgraph=True, backend="aot_eager")
    for T in (8, 13):  # second shape: recompiles or goes dynamic, either must work
        gate, up = make_pair(T, 24, torch.float32, "chunk", T)
        gate = gate.detach().requires_grad_(True)
        langs = torch.arange(T) % 3 - 1
        loss, oz, s = fn(gate, up, langs)
        want_loss, want_oz, want_s = _compiled_fn(gate, up, langs)
        assert torch.equal(oz, want_oz) and torch.equal(s, want_s)
        assert torch.allclose(loss, want_loss, rtol=1e-6, atol=1e-6)
        (g1,) = torch.autograd.grad(loss, gate)
        (g2,) = torch.autograd.grad(want_loss, gate)
        assert torch.allclose(g1, g2, rtol=1e-6, atol=1e-6)


def test_torch_compile_inductor():
    torch._dynamo.reset()
    fn = torch.compile(_compiled_fn, fullgraph=True, backend="inductor")
    gate, up = make_pair(9, 32, torch.float32, "contiguous", 3)
    langs = torch.arange(9) % 2
    loss, oz, s = fn(gate, up, langs)
    want = _compiled_fn(gate, up, langs)
    assert torch.equal(oz, want[1]) and torch.equal(s, want[2])
    assert torch.allclose(loss, want[0], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------- builds, import, backends --

_VARIANT_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from lape_kernels.kernels import ops, reference as ref
    assert ops.cpu_kernels == sys.argv[1], ops.cpu_kernels
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for act in ref.ACTIVATIONS:
            x = (torch.randn(37, 2 * 301, generator=gen) * 4).to(dtype)
            g, u = x.chunk(2, -1)
            langs = torch.randint(-1, 3, (37,), generator=gen)
            got = ops.act_mul_count(g, u, act, langs, 2)
            want = ref.act_mul_count(g, u, act, langs, 2)
            same = lambda a, b: bool(((a == b) | (a.isnan() & b.isnan())).all())  # noqa: E731
            assert all(same(a, b) for a, b in zip(got, want)), (dtype, act)
            go = torch.randn(37, 301, generator=gen).to(dtype)
            for a, b in zip(ops.act_mul_backward(go, g, u, act), ref.act_mul_backward(go, g, u, act)):
                assert same(a, b), (dtype, act)
    print("ok", ops.cpu_kernels)
    """
)


def _isa_supported(isa):
    have = torch.backends.cpu.get_cpu_capability()
    order = ["DEFAULT", "AVX2", "AVX512"]
    return have in order and order.index(have) >= order.index(isa.upper())


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_every_cpu_build_matches_reference(isa):
    """Each per-ISA module (chosen with ATEN_CPU_CAPABILITY, as for PyTorch's own kernels, which
    then run that ISA too) is bit-identical to the reference."""
    import importlib.util

    if importlib.util.find_spec(f"lape_kernels._cpu_{isa}") is None:
        pytest.skip(f"lape_kernels._cpu_{isa} was not built on this machine")
    if not _isa_supported(isa):
        pytest.skip(f"this CPU cannot run {isa}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
    res = subprocess.run([sys.executable, "-c", _VARIANT_SCRIPT, isa], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"ok {isa}" in res.stdout


def test_import_does_not_import_triton_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("with CUDA the Triton kernels may be registered at import")
    code = "import sys, lape_kernels.kernels.ops as o; print('triton' in sys.modules, o.current_cuda_backend())"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    expected = "cuda" if ops._HAS_CUDA_CPP else "triton"
    assert res.stdout.split() == ["False", expected]


def test_bad_backend_env_var_warns():
    code = "import warnings, lape_kernels.kernels.ops as o"
    env = dict(os.environ, LAPE_KERNELS_CUDA_BACKEND="opencl")
    res = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "LAPE_KERNELS_CUDA_BACKEND='opencl'" in res.stderr


def test_use_cuda_backend_switches_the_cuda_kernel():
    has = lambda: torch._C._dispatch_has_kernel_for_dispatch_key("lape_kernels::act_mul", "CUDA")  # noqa: E731
    with pytest.raises(ValueError, match="CUDA backend must be one of"):
        ops.use_cuda_backend("opencl")
    before = ops.current_cuda_backend()
    try:
        assert ops.use_cuda_backend("triton") == "triton"
        assert has() and ops.current_cuda_backend() == "triton"
        assert ops.use_cuda_backend("triton") == "triton"  # idempotent
        if ops._HAS_CUDA_CPP:
            assert ops.use_cuda_backend("cuda") == "cuda" and has()
        else:
            with pytest.raises(RuntimeError, match="not compiled in"):
                ops.use_cuda_backend("cuda")
            ops._unregister_triton()  # the Library is destroyed: no CUDA kernel left
            assert not has() and ops.current_cuda_backend() == "triton"
    finally:
        if before == "triton" and torch.cuda.is_available():
            ops.use_cuda_backend("triton")
        elif before == "cuda":
            ops.use_cuda_backend("cuda")
    # CPU kernels are untouched by any of this.
    gate, up = make_pair(3, 5, torch.float32, "contiguous", 0)
    assert_same(ops.act_mul(gate, up, "silu"), ref.act_mul(gate, up, "silu"))
