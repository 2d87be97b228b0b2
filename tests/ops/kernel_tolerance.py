"""How an op's result is compared with lape_kernels/reference.py, per backend.

Exact backends (the CPU kernels, the reference itself) must give the reference's bits
(``assert_same``). Counts (over_zero) are exact on every backend. The other backends (Triton,
CUDA C++, emulated or on a GPU) use their own exp/tanh/erf, so values follow this error model:

Results are rounded once to the dtype: (rtol, atol) per dtype. On top of that, act and act' are
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


def check_close(actual, expected, scale=None):
    """|actual - expected| <= atol + rtol |expected| + COND * scale, elementwise (NaN == NaN)."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.device == expected.device
    rtol, atol = TOL[expected.dtype]
    a, e = actual.float(), expected.float()
    tol = atol + rtol * e.abs()
    if scale is not None:
        tol = tol + COND * scale
    ok = (a == e) | (a.isnan() & e.isnan()) | ((a - e).abs() <= tol)
    if not bool(ok.all()):
        i = tuple((~ok).nonzero()[0].tolist())
        raise AssertionError(
            f"{int((~ok).sum())} of {ok.numel()} elements differ; first at {i}: "
            f"got {a[i].item()}, expected {e[i].item()}, tolerance {tol[i].item()}"
        )


def _check_sums(sums, expected, gate):
    tol = 1e-9 + 1e-6 * expected.abs() + COND * act_scale(gate).double().sum(0)
    ok = (sums == expected) | (sums.isnan() & expected.isnan()) | ((sums - expected).abs() <= tol)
    assert bool(ok.all()), f"act_sum differs at {(~ok).nonzero()[:5].tolist()}"


def _scales(op: str, args):
    """Per-output error-model scales of op ``op`` called with ``args`` (None: no extra term)."""
    if op == "act_mul":
        return [fwd_scale(args[0], args[1])]
    if op == "act_mul_count":
        return [fwd_scale(args[0], args[1]), None, None]
    if op == "act_mul_backward":
        return list(bwd_scales(*args[:3]))
    if op == "act_mul_split":
        s = fwd_scale(args[0], args[1])
        return [s, s[:, args[3]]]
    if op == "act_mul_backward_split":
        grad_out, grad_out_sel, gate, up, _, sel = args
        dh = grad_out.float().index_copy(1, sel, grad_out_sel.float())
        sg, su = bwd_scales(dh, gate, up)
        return [sg, su, sg[:, sel], su[:, sel], fwd_scale(gate, up)[:, sel]]
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
            _check_sums(a, e, args[0])
        else:
            assert a.is_contiguous(), f"{op} output {i} is not contiguous"
            check_close(a, e, s)
    if op in ("act_mul_split", "act_mul_backward_split"):
        sel = args[3] if op == "act_mul_split" else args[5]
        for a in got[:1 if op == "act_mul_split" else 2]:
            assert bool((a[:, sel] == 0).all()), "selected columns must be zero in the full outputs"
