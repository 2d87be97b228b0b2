"""Shared error model of the kernel tests (Triton and CUDA C++ against lape_kernels/reference.py)."""
from __future__ import annotations

import torch

from lape_kernels.kernels import reference as ref

# Error model. Results are rounded once to the dtype: (rtol, atol) per dtype. On top of that,
# act and act' are ill-conditioned in fp32 where 1 + tanh/erf or 1 - sigmoid cancel (gelu* for
# g < -3, silu' for g > 3): a few ulps of difference between two correct tanh/erf/exp (the
# reference's included) move act(g) by ~|g| ulps and act'(g) by ~|g|^3 ulps. So the tolerance
# also carries COND (8 fp32 ulps of 1) times a per-element scale: |u| (1 + |g|) for act * up,
# |dh| |u| (1 + |g| (1 + 0.135 g^2)) for grad_gate, |dh| (1 + |g|) for grad_up.
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


def check_count(got, gate, up, activation, token_lang, num_langs):
    """Counts bit-exact; outputs and float64 sums within the error model."""
    out, oz, sums = got
    exp = ref.act_mul_count(gate, up, activation, token_lang, num_langs)
    assert oz.dtype == torch.int64 and sums.dtype == torch.float64
    assert oz.shape == sums.shape == (num_langs, gate.shape[1])
    check_close(out, exp[0], fwd_scale(gate, up))
    assert torch.equal(oz, exp[1])
    tol = 1e-9 + 1e-6 * exp[2].abs() + COND * act_scale(gate).double().sum(0)
    ok = (sums == exp[2]) | (sums.isnan() & exp[2].isnan()) | ((sums - exp[2]).abs() <= tol)
    assert bool(ok.all()), f"act_sum differs at {(~ok).nonzero()[:5].tolist()}"


def check_backward(got, grad_out, gate, up, activation):
    sg, su = bwd_scales(grad_out, gate, up)
    for a, e, s in zip(got, ref.act_mul_backward(grad_out, gate, up, activation), (sg, su)):
        check_close(a, e, s)


def check_split(got, gate, up, activation, sel):
    assert len(got) == 2
    s = fwd_scale(gate, up)
    for a, e, sc in zip(got, ref.act_mul_split(gate, up, activation, sel), (s, s[:, sel])):
        check_close(a, e, sc)
    assert torch.all(got[0][:, sel] == 0)


def check_backward_split(got, grad_out, grad_out_sel, gate, up, activation, sel):
    assert len(got) == 5
    exp = ref.act_mul_backward_split(grad_out, grad_out_sel, gate, up, activation, sel)
    dh = grad_out.float().index_copy(1, sel, grad_out_sel.float())
    sg, su = bwd_scales(dh, gate, up)
    so = fwd_scale(gate, up)
    for a, e, s in zip(got, exp, (sg, su, sg[:, sel], su[:, sel], so[:, sel])):
        check_close(a, e, s)
