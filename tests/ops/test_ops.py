"""The compiled CPU ops (torch.ops.lape_kernels.*) against the plain-PyTorch oracle
lape_kernels/reference.py: values, exact counts, autograd, torch.compile, opcheck, argument
errors, the per-ISA builds and the CUDA backend switch.

Tolerances. Counts and selections are exact (torch.equal). Values: the kernels compute in fp32
like the reference but with their own exp/sigmoid (a few ulp apart) and, for gelu/gelu_tanh, an
erf/tanh that differs from the reference's by ~1e-7 *absolutely*; the reference's
``1 + tanh``/``1 + erf`` cancels in the negative tail, so the difference is bounded relative to
the size of the terms (|out| + |gate * up|), not to |out|. fp32 outputs must agree within
1e-6 of that; bf16/fp16 outputs within one rounding of the output dtype on top.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lape_kernels.kernels import ops
from lape_kernels.kernels import reference as ref

ACTS = ref.ACTIVATIONS
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HSET = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------------- helpers --


def make_pair(T, I, dtype, layout, seed, scale=3.0):
    """gate, up [T, I] in one of the layouts the ops accept without copying."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "chunk":  # the two halves of a fused [T, 2I] projection (Phi-3)
        x = (torch.randn(T, 2 * I, generator=gen) * scale).to(dtype)
        return x.chunk(2, dim=-1)
    if layout == "padded":  # row stride larger than I
        g = (torch.randn(T, I + 7, generator=gen) * scale).to(dtype)[:, 3 : 3 + I]
        u = (torch.randn(T, I + 5, generator=gen)).to(dtype)[:, :I]
        return g, u
    g = (torch.randn(T, I, generator=gen) * scale).to(dtype)
    u = torch.randn(T, I, generator=gen).to(dtype)
    return g, u


def rand_like(t, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(t.shape, generator=gen) * scale).to(t.dtype)


def check_close(out, expected, scale):
    """out == expected within 1e-6 * (|expected| + scale) (+ one output-dtype rounding)."""
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert out.is_contiguous()
    o, r = out.double(), expected.double()
    tol = 1e-6 * (r.abs() + scale.double())
    if out.dtype != torch.float32:
        fi = torch.finfo(out.dtype)
        tol = tol + fi.eps * r.abs() + fi.tiny * fi.eps
    bad = (o - r).abs() > tol
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} differ; worst: got {o[bad][:4].tolist()} "
        f"expected {r[bad][:4].tolist()}"
    )


def fwd_scale(gate, up):
    return (gate.float() * up.float()).abs()


def bwd_scales(grad_out, gate, up):
    g, u, go = gate.float(), up.float(), grad_out.float()
    return (go * u).abs() * (1 + g.abs()), (go * g).abs()


def lang_rows(token_lang, T, k):
    """Rows counted for language k (token_lang None: every row is language 0)."""
    if token_lang is None:
        return torch.full((T,), k == 0, dtype=torch.bool)
    return token_lang == k


def check_count(result, gate, up, activation, token_lang, num_langs):
    out, over_zero, act_sum = result
    r_out, r_oz, r_sum = ref.act_mul_count(gate, up, activation, token_lang, num_langs)
    check_close(out, r_out, fwd_scale(gate, up))
    assert over_zero.dtype == torch.int64 and act_sum.dtype == torch.float64
    assert torch.equal(over_zero, r_oz)
    # Sum of the fp32 act values: per-term error ~1e-7 (|act| + |gate|), fp32 partial sums.
    a = ref.act_fp32(gate, activation).double().abs() + gate.double().abs()
    scale = torch.stack([a[lang_rows(token_lang, gate.shape[0], k)].sum(0) for k in range(num_langs)])
    assert act_sum.shape == r_sum.shape
    assert ((act_sum - r_sum).abs() <= 2e-6 * scale + 1e-30).all()


def check_backward(result, grad_out, gate, up, activation):
    r = ref.act_mul_backward(grad_out, gate, up, activation)
    for got, exp, scale in zip(result, r, bwd_scales(grad_out, gate, up)):
        check_close(got, exp, scale)


def check_split(result, gate, up, activation, sel):
    out, out_sel = result
    r_out, r_sel = ref.act_mul_split(gate, up, activation, sel)
    s = fwd_scale(gate, up)
    check_close(out, r_out, s)
    check_close(out_sel, r_sel, s[:, sel])
    # Exactly zero at sel, and out_sel is exactly act_mul's value there.
    assert (out[:, sel] == 0).all()
    assert torch.equal(out_sel, ops.act_mul(gate, up, activation)[:, sel])


def check_backward_split(result, grad_out, grad_out_sel, gate, up, activation, sel):
    gg, gu, ggs, gus, osel = result
    r = ref.act_mul_backward_split(grad_out, grad_out_sel, gate, up, activation, sel)
    dh = grad_out.index_copy(1, sel, grad_out_sel)
    sg, su = bwd_scales(dh, gate, up)
    for got, exp, scale in zip((gg, gu, ggs, gus, osel), r, (sg, su, sg[:, sel], su[:, sel], fwd_scale(gate, up)[:, sel])):
        check_close(got, exp, scale)
    assert (gg[:, sel] == 0).all() and (gu[:, sel] == 0).all()


shapes = st.tuples(st.integers(0, 70), st.integers(1, 300))
layouts = st.sampled_from(("contiguous", "chunk", "padded"))
seeds = st.integers(0, 2**31 - 1)


def draw_sel(data, I):
    chosen = data.draw(st.sets(st.integers(0, I - 1), max_size=min(I, 40)))
    return torch.tensor(sorted(chosen), dtype=torch.int64)


# ------------------------------------------------------------------------ values vs oracle --


@HSET
@given(shape=shapes, dtype=st.sampled_from(DTYPES), act=st.sampled_from(ACTS), layout=layouts, seed=seeds)
def test_act_mul_matches_reference(shape, dtype, act, layout, seed):
    gate, up = make_pair(*shape, dtype, layout, seed)
    out = ops.act_mul(gate, up, act)
    check_close(out, ref.act_mul(gate, up, act), fwd_scale(gate, up))


@HSET
@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    act=st.sampled_from(ACTS),
    layout=layouts,
    seed=seeds,
    num_langs=st.integers(1, 5),
    lang_mode=st.sampled_from(("none", "random", "runs")),
)
def test_act_mul_count_matches_reference(shape, dtype, act, layout, seed, num_langs, lang_mode):
    T, I = shape
    gate, up = make_pair(T, I, dtype, layout, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    if lang_mode == "none":
        token_lang = None
    elif lang_mode == "random":  # includes padding (-1) and ids >= num_langs, never counted
        token_lang = torch.randint(-1, num_langs + 2, (T,), generator=gen)
    else:  # contiguous runs of one language, as batches of sequences give
        token_lang = torch.randint(-1, num_langs, (T,), generator=gen).sort().values
    check_count(ops.act_mul_count(gate, up, act, token_lang, num_langs), gate, up, act, token_lang, num_langs)


@HSET
@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    act=st.sampled_from(ACTS),
    layout=layouts,
    seed=seeds,
    grad_layout=st.sampled_from(("contiguous", "transposed", "expanded")),
)
def test_act_mul_backward_matches_reference(shape, dtype, act, layout, seed, grad_layout):
    gate, up = make_pair(*shape, dtype, layout, seed)
    grad_out = rand_like(gate, seed + 2)
    if grad_layout == "transposed":  # stride(1) != 1: the op copies it
        grad_out = grad_out.t().contiguous().t()
    elif grad_layout == "expanded":  # stride(0) == 0, what autograd hands over for .sum()
        grad_out = grad_out[:1].expand_as(gate) if gate.shape[0] else grad_out
    check_backward(ops.act_mul_backward(grad_out, gate, up, act), grad_out, gate, up, act)


@HSET
@given(data=st.data(), shape=shapes, dtype=st.sampled_from(DTYPES), act=st.sampled_from(ACTS), layout=layouts, seed=seeds)
def test_act_mul_split_matches_reference(data, shape, dtype, act, layout, seed):
    gate, up = make_pair(*shape, dtype, layout, seed)
    sel = draw_sel(data, shape[1])
    check_split(ops.act_mul_split(gate, up, act, sel), gate, up, act, sel)


@HSET
@given(data=st.data(), shape=shapes, dtype=st.sampled_from(DTYPES), act=st.sampled_from(ACTS), layout=layouts, seed=seeds)
def test_act_mul_backward_split_matches_reference(data, shape, dtype, act, layout, seed):
    gate, up = make_pair(*shape, dtype, layout, seed)
    sel = draw_sel(data, shape[1])
    grad_out = rand_like(gate, seed + 3)
    grad_out_sel = rand_like(torch.empty(shape[0], len(sel), dtype=dtype), seed + 4)
    result = ops.act_mul_backward_split(grad_out, grad_out_sel, gate, up, act, sel)
    check_backward_split(result, grad_out, grad_out_sel, gate, up, act, sel)


def test_split_selects_all_and_none():
    gate, up = make_pair(5, 33, torch.float32, "contiguous", 0)
    full = torch.arange(33)
    out, out_sel = ops.act_mul_split(gate, up, "silu", full)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(out_sel, ops.act_mul(gate, up, "silu"))
    out, out_sel = ops.act_mul_split(gate, up, "silu", full[:0])
    assert out_sel.shape == (5, 0) and torch.equal(out, ops.act_mul(gate, up, "silu"))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(act, dtype):
    """0, -0, subnormals, huge values, +-inf and NaN: counts exact, values as the reference."""
    fi = torch.finfo(dtype)
    specials = [0.0, -0.0, fi.tiny, -fi.tiny, fi.tiny / 4, 1e-30, -1e-30, 1e-3, -1e-3, 5.0, -5.0, 9.0, -9.0,
                30.0, -30.0, 90.0, -90.0, 110.0, -110.0, fi.max, -fi.max, float("inf"), float("-inf"), float("nan")]
    g = torch.tensor(specials, dtype=torch.float32).to(dtype)
    gate = g.repeat(3, 1)
    up = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float32).to(dtype)[:, None].expand_as(gate).contiguous()
    out, oz, s = ops.act_mul_count(gate, up, act, None, 1)
    r_out, r_oz, r_s = ref.act_mul_count(gate, up, act, None, 1)
    assert torch.equal(oz, r_oz)
    assert torch.equal(oz[0], (ref.act_fp32(gate, act) > 0).sum(0))
    finite = torch.isfinite(r_out) & torch.isfinite(gate.float() * up.float())
    check_close(torch.where(finite, out, 0), torch.where(finite, r_out, 0), fwd_scale(gate, up).nan_to_num(0))
    assert torch.equal(torch.isnan(out), torch.isnan(r_out))
    assert torch.equal(out[~finite & ~torch.isnan(r_out)], r_out[~finite & ~torch.isnan(r_out)])
    assert torch.equal(torch.isnan(s), torch.isnan(r_s))


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


def test_count_with_many_languages_few_present():
    """num_langs is only a bound: languages without rows cost nothing and count zero."""
    gate, up = make_pair(40, 100, torch.float32, "contiguous", 8)
    token_lang = torch.tensor([0, 999, -1, 500] * 10)
    out, oz, s = ops.act_mul_count(gate, up, "silu", token_lang, 1000)
    check_count((out, oz, s), gate, up, "silu", token_lang, 1000)
    assert oz.shape == (1000, 100) and int((oz.sum(1) > 0).sum()) <= 3


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_is_bit_identical_to_pytorch_activation(act, dtype):
    """act_mul == (F.act(gate.float()) * up.float()).to(dtype) bit for bit (rows a multiple of 64
    long, where PyTorch vectorises): a patched HF MLP then computes exactly what the unpatched
    one does in fp32-with-one-rounding, so LAPE counts match the hook's in every layer."""
    f = torch.nn.functional.silu if act == "silu" else (lambda x: torch.nn.functional.gelu(x, approximate="tanh"))
    gate, up = make_pair(45, 256, dtype, "contiguous", 21, scale=4.0)
    want = (f(gate.float()) * up.float()).to(dtype)
    assert torch.equal(ops.act_mul(gate, up, act), want)
    assert torch.equal(ops.act_mul_count(gate, up, act, None, 1)[0], want)
    sel = torch.tensor([3, 100])
    assert torch.equal(ops.act_mul_split(gate, up, act, sel)[1], want[:, sel])
    go = rand_like(gate, 5)
    gos = rand_like(want[:, sel], 6)
    assert torch.equal(ops.act_mul_backward_split(go, gos, gate, up, act, sel)[4], want[:, sel])
    # grad_up = grad_out * act(gate): the forward's act values, one rounding.
    assert torch.equal(ops.act_mul_backward(go, gate, up, act)[1], (go.float() * f(gate.float())).to(dtype))


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


def test_empty_and_tiny_shapes():
    for T, I in ((0, 1), (0, 64), (1, 1), (1, 31), (2, 33)):
        gate, up = make_pair(T, I, torch.float32, "contiguous", T * 100 + I)
        assert ops.act_mul(gate, up, "silu").shape == (T, I)
        out, oz, s = ops.act_mul_count(gate, up, "silu", None, 2)
        assert out.shape == (T, I) and oz.shape == (2, I) and s.shape == (2, I)
        check_count((out, oz, s), gate, up, "silu", None, 2)
        gg, gu = ops.act_mul_backward(torch.ones(T, I), gate, up, "gelu")
        assert gg.shape == gu.shape == (T, I)
        sel = torch.tensor([0], dtype=torch.int64)
        assert ops.act_mul_split(gate, up, "silu", sel)[1].shape == (T, 1)
        assert ops.act_mul_backward_split(torch.ones(T, I), torch.ones(T, 1), gate, up, "silu", sel)[4].shape == (T, 1)


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
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_autograd_act_mul_and_count(act, dtype):
    gate, up = make_pair(13, 70, dtype, "contiguous", 4)
    want = _grads(lambda g, u: ref.act_mul(g, u, act), gate, up)
    got = _grads(lambda g, u: ops.act_mul(g, u, act), gate, up)
    go = rand_like(gate, 100)
    for a, b, s in zip(got, want, bwd_scales(go, gate, up)):
        check_close(a, b, s)
    langs = torch.tensor([0, 1, -1] * 4 + [1])
    got = _grads(lambda g, u: ops.act_mul_count(g, u, act, langs, 2)[0], gate, up)
    for a, b, s in zip(got, want, bwd_scales(go, gate, up)):
        check_close(a, b, s)


def test_autograd_count_outputs_are_not_differentiable():
    gate, up = make_pair(3, 8, torch.float32, "contiguous", 0)
    gate.requires_grad_(True)
    out, oz, s = ops.act_mul_count(gate, up, "silu", None, 1)
    assert out.requires_grad and not oz.requires_grad and not s.requires_grad


@pytest.mark.parametrize("act", ACTS)
def test_autograd_act_mul_split(act):
    gate, up = make_pair(11, 45, torch.float32, "contiguous", 9)
    sel = torch.tensor([0, 3, 17, 44])
    want = _grads(lambda g, u: ref.act_mul_split(g, u, act, sel), gate, up)
    got = _grads(lambda g, u: ops.act_mul_split(g, u, act, sel), gate, up)
    go = rand_like(gate, 100).index_copy(1, sel, rand_like(torch.empty(11, 4), 101))
    for a, b, s in zip(got, want, bwd_scales(go, gate, up)):
        check_close(a, b, s)


def test_autograd_through_fused_halves():
    """Phi-3 style: gate/up are views of one tensor; its gradient is assembled from both."""
    x = (torch.randn(6, 2 * 40, generator=torch.Generator().manual_seed(1)) * 2).requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    w = torch.randn(6, 40)
    (ops.act_mul(*x.chunk(2, -1), "gelu_tanh") * w).sum().backward()
    (ref.act_mul(*xr.chunk(2, -1), "gelu_tanh") * w).sum().backward()
    g, u = xr.detach().chunk(2, -1)
    sg, su = bwd_scales(w, g, u)
    check_close(x.grad, xr.grad, torch.cat([sg, su], -1))


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


# ----------------------------------------------------------------------------- bad arguments --


def _bad_cases():
    g = torch.randn(4, 6)
    u = torch.randn(4, 6)
    sel = torch.tensor([1, 3])
    gos = torch.randn(4, 2)
    langs = torch.zeros(4, dtype=torch.int64)
    L = ops
    return {
        "int gate": (lambda: L.act_mul(g.long(), u.long(), "silu"), "gate must be float32"),
        "float64 gate": (lambda: L.act_mul(g.double(), u.double(), "silu"), "gate must be float32"),
        "dtype mismatch": (lambda: L.act_mul(g, u.half(), "silu"), "same dtype"),
        "1-D": (lambda: L.act_mul(g[0], u[0], "silu"), "gate must be 2-D"),
        "3-D": (lambda: L.act_mul(g[None], u[None], "silu"), "gate must be 2-D"),
        "shape mismatch": (lambda: L.act_mul(g, u[:, :5], "silu"), "same shape"),
        "up 1-D": (lambda: L.act_mul(g, u[0], "silu"), "up must be 2-D"),
        "strided last dim": (lambda: L.act_mul(g.t(), u.t(), "silu"), "stride"),
        "activation": (lambda: L.act_mul(g, u, "relu"), "activation must be one of"),
        "activation count": (lambda: L.act_mul_count(g, u, "gelu_new", None, 1), "activation must be one of"),
        "activation backward": (lambda: L.act_mul_backward(g, g, u, "tanh"), "activation must be one of"),
        "num_langs 0": (lambda: L.act_mul_count(g, u, "silu", None, 0), "num_langs must be >= 1"),
        "num_langs -1": (lambda: L.act_mul_count(g, u, "silu", langs, -1), "num_langs must be >= 1"),
        "token_lang length": (lambda: L.act_mul_count(g, u, "silu", langs[:3], 2), "token_lang must be int64 of shape"),
        "token_lang dtype": (lambda: L.act_mul_count(g, u, "silu", langs.int(), 2), "token_lang must be int64"),
        "token_lang 2-D": (lambda: L.act_mul_count(g, u, "silu", langs[None], 2), "token_lang must be int64"),
        "grad_out shape": (lambda: L.act_mul_backward(g[:3], g, u, "silu"), "grad_out and gate must have the same shape"),
        "grad_out dtype": (lambda: L.act_mul_backward(g.half(), g, u, "silu"), "grad_out and gate must have the same dtype"),
        "sel dtype": (lambda: L.act_mul_split(g, u, "silu", sel.int()), "sel must be a 1-D int64"),
        "sel 2-D": (lambda: L.act_mul_split(g, u, "silu", sel[None]), "sel must be a 1-D int64"),
        "sel too large": (lambda: L.act_mul_split(g, u, "silu", torch.tensor([1, 6])), r"sel values must be in \[0, 6\)"),
        "sel negative": (lambda: L.act_mul_split(g, u, "silu", torch.tensor([-1, 2])), r"sel values must be in"),
        "sel unsorted": (lambda: L.act_mul_split(g, u, "silu", torch.tensor([3, 1])), "sorted ascending and unique"),
        "sel duplicate": (lambda: L.act_mul_split(g, u, "silu", torch.tensor([2, 2])), "sorted ascending and unique"),
        "split bwd sel": (lambda: L.act_mul_backward_split(g, gos, g, u, "silu", torch.tensor([0, 9])), "sel values"),
        "grad_out_sel shape": (lambda: L.act_mul_backward_split(g, gos[:, :1], g, u, "silu", sel), "grad_out_sel must have shape"),
        "grad_out_sel dtype": (lambda: L.act_mul_backward_split(g, gos.double(), g, u, "silu", sel), "grad_out_sel must have the dtype"),
        "split bwd grad_out": (lambda: L.act_mul_backward_split(g.bfloat16(), gos, g, u, "silu", sel), "grad_out and gate"),
        "meta device mix": (lambda: L.act_mul(g, u.to("meta"), "silu"), "same device|must be a CPU tensor|meta"),
    }


@pytest.mark.parametrize("name", sorted(_bad_cases()))
def test_bad_arguments_raise_clear_errors(name):
    fn, message = _bad_cases()[name]
    with pytest.raises((ValueError, RuntimeError), match=message):
        fn()


@pytest.mark.parametrize("name", ["float64 gate", "3-D", "shape mismatch", "activation", "num_langs 0", "sel dtype", "strided last dim"])
def test_bad_arguments_raise_under_fake_tensors(name):
    """The fake (tracing) implementations reject the same arguments."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fn, message = _bad_cases()[name]
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises((ValueError, RuntimeError), match=message):
            fn()


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
            out, oz, s = ops.act_mul_count(g, u, act, langs, 2)
            r_out, r_oz, r_s = ref.act_mul_count(g, u, act, langs, 2)
            assert torch.equal(oz, r_oz), (dtype, act)
            tol = 1e-6 * (r_out.double().abs() + (g.double() * u.double()).abs())
            if dtype != torch.float32:
                tol += torch.finfo(dtype).eps * r_out.double().abs() + torch.finfo(dtype).tiny
            assert ((out.double() - r_out.double()).abs() <= tol).all(), (dtype, act)
            go = torch.randn(37, 301, generator=gen).to(dtype)
            for a, b in zip(ops.act_mul_backward(go, g, u, act), ref.act_mul_backward(go, g, u, act)):
                assert torch.allclose(a.double(), b.double(), rtol=2e-2, atol=1e-3), (dtype, act)
    print("ok", ops.cpu_kernels)
    """
)


def _isa_supported(isa):
    have = torch.backends.cpu.get_cpu_capability()
    order = ["DEFAULT", "AVX2", "AVX512"]
    return have in order and order.index(have) >= order.index(isa.upper())


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_every_cpu_build_matches_reference(isa):
    """Each per-ISA module (chosen with ATEN_CPU_CAPABILITY, as for PyTorch's kernels)."""
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
    check_close(ops.act_mul(gate, up, "silu"), ref.act_mul(gate, up, "silu"), fwd_scale(gate, up))
