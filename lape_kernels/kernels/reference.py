"""Plain-PyTorch reference implementations of every ``lape_kernels`` op.

These are the test oracle: written for clarity, not speed, with the same names, signatures and
semantics as the compiled ops (see docs/ARCHITECTURE.md). Arithmetic is float32, results are
rounded once to the input dtype, exactly as the kernels are specified to do.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import checks
from .checks import ACTIVATIONS  # noqa: F401 - re-exported: the oracle names its activations

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def act_fp32(gate: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) in float32."""
    checks.check_activation(activation)
    g = gate.float()
    if activation == "silu":
        return g * torch.sigmoid(g)
    if activation == "gelu_tanh":
        return 0.5 * g * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)))
    return 0.5 * g * (1.0 + torch.erf(g * _INV_SQRT_2))


def act_grad_fp32(gate: torch.Tensor, activation: str) -> torch.Tensor:
    """d act / d gate in float32."""
    checks.check_activation(activation)
    g = gate.float()
    if activation == "silu":
        s = torch.sigmoid(g)
        return s * (1.0 + g * (1.0 - s))
    if activation == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
        t = torch.tanh(inner)
        d_inner = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * g * g)
        return 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * d_inner
    return 0.5 * (1.0 + torch.erf(g * _INV_SQRT_2)) + g * _INV_SQRT_2PI * torch.exp(-0.5 * g * g)


def act_mul(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    checks.act_mul_args(gate, up, activation)
    return (act_fp32(gate, activation) * up.float()).to(gate.dtype)


def act_mul_count(
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str,
    token_lang: Optional[torch.Tensor],
    num_langs: int,
):
    checks.act_mul_count_args(gate, up, activation, token_lang, num_langs)
    T, I = gate.shape
    if token_lang is None:
        token_lang = torch.zeros(T, dtype=torch.int64, device=gate.device)
    a = act_fp32(gate, activation)
    out = (a * up.float()).to(gate.dtype)
    over_zero = torch.zeros(num_langs, I, dtype=torch.int64, device=gate.device)
    act_sum = torch.zeros(num_langs, I, dtype=torch.float64, device=gate.device)
    for k in range(num_langs):
        rows = token_lang == k
        over_zero[k] = (a[rows] > 0).sum(0, dtype=torch.int64)
        act_sum[k] = a[rows].double().sum(0)
    return out, over_zero, act_sum


def gate_up_act_mul_count(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    activation: str,
    token_lang: Optional[torch.Tensor],
    num_langs: int,
):
    """act_mul_count of the two projections gate = x w_gate^T, up = x w_up^T, never rounded.

    gate and up are the float32 results of a float32 GEMM of the upcast inputs (not rounded to
    x.dtype: the fused kernels keep them in fp32 accumulators); act, the product and the counts
    are then exactly act_mul_count's on those fp32 values, and out is rounded once to x.dtype.
    The GEMM's summation order is not part of the contract (kernels differ from this by GEMM
    rounding, so a count may differ only where |gate| is within that rounding of 0).
    """
    checks.gate_up_act_mul_count_args(x, w_gate, w_up, activation, token_lang, num_langs)
    gate = x.float() @ w_gate.float().T
    up = x.float() @ w_up.float().T
    out, over_zero, act_sum = act_mul_count(gate, up, activation, token_lang, num_langs)
    return out.to(x.dtype), over_zero, act_sum


def act_mul_backward(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str):
    checks.act_mul_backward_args(grad_out, gate, up, activation)
    go = grad_out.float()
    grad_gate = go * up.float() * act_grad_fp32(gate, activation)
    grad_up = go * act_fp32(gate, activation)
    return grad_gate.to(gate.dtype), grad_up.to(gate.dtype)


def act_mul_split(gate: torch.Tensor, up: torch.Tensor, activation: str, sel: torch.Tensor):
    checks.act_mul_split_args(gate, up, activation, sel)
    h = act_fp32(gate, activation) * up.float()
    out_sel = h[:, sel]
    out = h.index_fill(1, sel, 0.0)
    return out.to(gate.dtype), out_sel.to(gate.dtype).contiguous()


def act_mul_backward_split(
    grad_out: torch.Tensor,
    grad_out_sel: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str,
    sel: torch.Tensor,
):
    checks.act_mul_backward_split_args(grad_out, grad_out_sel, gate, up, activation, sel)
    dh = grad_out.float().index_copy(1, sel, grad_out_sel.float())
    a = act_fp32(gate, activation)
    g = dh * up.float() * act_grad_fp32(gate, activation)
    u = dh * a
    dt = gate.dtype
    return (
        g.index_fill(1, sel, 0.0).to(dt),
        u.index_fill(1, sel, 0.0).to(dt),
        g[:, sel].to(dt).contiguous(),
        u[:, sel].to(dt).contiguous(),
        (a * up.float())[:, sel].to(dt).contiguous(),
    )
