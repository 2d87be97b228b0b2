"""How an op's result is compared with lape_kernels/reference.py, per backend.

Exact backends (the CPU kernels, the reference itself) must give the reference's bits
(``assert_same``). Counts (over_zero) are exact on every backend. The other backends (Triton,
CUDA C++, emulated or on a GPU) follow the same rounding points with their own exp/tanh/erf, so
values follow this error model:

Outputs are rounded to the dtype: (rtol, atol) per dtype. a = act(gate) is rounded to the dtype
before it multiplies: where the fp32 act lies within an ulp of a rounding boundary, two correct
implementations may round it to neighbours, so terms eps(dtype) |a| |u| (out, out_sel),
eps |a| |dh| (grad_up) and eps sum |a| (act_sum) are added. On top of that, act and act' are
ill-conditioned in fp32 where 1 + tanh/erf or 1 - sigmoid cancel (gelu* for g < -3, silu' for
g > 3): a few ulps of difference between two correct tanh/erf/exp (the reference's included) move
act(g) by ~|g| ulps and act'(g) by ~|g|^3 ulps. So the tolerance also carries COND (8 fp32 ulps
of 1) times a per-element scale: |u| (1 + |g|) for act * up, |dh| |u| (1 + |g| (1 + 0.135 g^2))
for grad_gate, |dh| (1 + |g|) for grad_up.
"""
from __future__ import annotations

import torch

from lape_kernels.kernels import reference as ref

TOL = {torch.float32: (2e-5, 1e-6), torch.float16: (1e-3, 1e-5), torch.bfloat16: (8e-3, 1e-5)}
COND = 2.0**-21


def act_scale(gate):
    return 1.0 + gate.float().abs()


def fwd_scale(gate, up):
    return act_scale(gate) * up.float().abs()


def rounding_term(gate, other, activation):
    """eps(dtype) |act(gate)| |other|: one ulp of the rounded act, times what multiplies it."""
    if gate.dtype == torch.float32:
        return None
    return torch.finfo(gate.dtype).eps * ref.act(gate, activation).float().abs() * other.float().abs()


def bwd_scales(dh, gate, up):
    g = gate.float().abs()
    dh = dh.float().abs()
    return dh * up.float().abs() * (1.0 + g * (1.0 + 0.135 * g * g)), dh * act_scale(gate)


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bit-identical (NaN where the reference has NaN), same dtype, shape and device."""
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.device == expected.device, (what, actual.device, expected.device)
    if actual.dtype.is_floating_point:
        same = (actual == expected) | (actual.isnan() & expected.isnan())
        # signed zeros count: 0 and -0 are different bits
        same &= (torch.signbit(actual) == torch.signbit(expected)) | actual.isnan()
    else:
        same = actual == expected
    if not bool(same.all()):
        i = tuple((~same).nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int((~same).sum())} of {same.numel()} elements differ; first at {i}: "
                             f"got {actual[i].item()!r}, expected {expected[i].item()!r}")


def check_close(actual, expected, scale=None, extra=None):
    """|actual - expected| <= atol + rtol |expected| + COND * scale + extra, elementwise (NaN == NaN)."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.device == expected.device
    rtol, atol = TOL[expected.dtype]
    a, e = actual.float(), expected.float()
    tol = atol + rtol * e.abs()
    if scale is not None:
        tol = tol + COND * scale
    if extra is not None:
        tol = tol + extra.nan_to_num(0.0, posinf=0.0)
    ok = (a == e) | (a.isnan() & e.isnan()) | ((a - e).abs() <= tol)
    if not bool(ok.all()):
        i = tuple((~ok).nonzero()[0].tolist())
        raise AssertionError(
            f"{int((~ok).sum())} of {ok.numel()} elements differ; first at {i}: "
            f"got {a[i].item()}, expected {e[i].item()}, tolerance {tol[i].item()}"
        )


def _check_sums(sums, expected, gate, activation, token_lang):
    tol = 1e-9 + 1e-6 * expected.abs() + COND * act_scale(gate).double().sum(0)
    if gate.dtype != torch.float32:  # each a may round to a neighbour (see the module docstring)
        a = ref.act(gate, activation).double().abs().nan_to_num(0.0, posinf=0.0)
        lang = torch.zeros(gate.shape[0], dtype=torch.int64, device=gate.device) if token_lang is None else token_lang
        per_lang = torch.stack([a[lang == k].sum(0) for k in range(expected.shape[0])])
        tol = tol + torch.finfo(gate.dtype).eps * per_lang
    ok = (sums == expected) | (sums.isnan() & expected.isnan()) | ((sums - expected).abs() <= tol)
    assert bool(ok.all()), f"act_sum differs at {(~ok).nonzero()[:5].tolist()}"


def _scales(op: str, args):
    """Per-output (COND scale, rounding term) of op ``op`` called with ``args`` (see above)."""
    if op in ("act_mul", "act_mul_count", "act_mul_split"):
        gate, up, act = args[0], args[1], args[2]
        s, r = fwd_scale(gate, up), rounding_term(gate, up, act)
        if op == "act_mul":
            return [(s, r)]
        if op == "act_mul_count":
            return [(s, r), None, None]
        sel = args[3]
        return [(s, r), (s[:, sel], None if r is None else r[:, sel])]
    if op == "act_mul_backward":
        grad_out, gate, up, act = args
        sg, su = bwd_scales(grad_out, gate, up)
        return [(sg, None), (su, rounding_term(gate, grad_out, act))]
    if op == "act_mul_backward_split":
        grad_out, grad_out_sel, gate, up, act, sel = args
        dh = grad_out.float().index_copy(1, sel, grad_out_sel.float())
        sg, su = bwd_scales(dh, gate, up)
        ru, rf = rounding_term(gate, dh, act), rounding_term(gate, up, act)
        pick = lambda t: None if t is None else t[:, sel]  # noqa: E731
        return [(sg, None), (su, ru), (sg[:, sel], None), (su[:, sel], pick(ru)),
                (fwd_scale(gate, up)[:, sel], pick(rf))]
    raise ValueError(op)


def check_op(backend, op: str, got, *args) -> None:
    """``got`` = backend's ``op(*args)`` against reference.``op(*args)`` (same device)."""
    expected = getattr(ref, op)(*args)
    got = got if isinstance(got, tuple) else (got,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(got) == len(expected)
    if op == "act_mul_count":
        assert got[1].dtype == torch.int64 and got[2].dtype == torch.float64
        assert_same(got[1], expected[1], "over_zero")
    if backend.exact:
        for i, (a, e) in enumerate(zip(got, expected)):
            assert_same(a, e, f"{op} output {i}")
        return
    for i, (a, e, s) in enumerate(zip(got, expected, _scales(op, args))):
        if op == "act_mul_count" and i == 1:
            continue
        if op == "act_mul_count" and i == 2:
            _check_sums(a, e, args[0], args[2], args[3])
        else:
            assert a.is_contiguous(), f"{op} output {i} is not contiguous"
            check_close(a, e, *s)
    if op in ("act_mul_split", "act_mul_backward_split"):
        sel = args[3] if op == "act_mul_split" else args[5]
        for a in got[:1 if op == "act_mul_split" else 2]:
            assert bool((a[:, sel] == 0).all()), "selected columns must be zero in the full outputs"
