"""Plain-PyTorch reference implementations of every ``lape_kernels`` op: the test oracle.

Same names, signatures and semantics as the compiled ops (docs/ARCHITECTURE.md). The semantics
are those of the Hugging Face MLP the ops replace, so the oracle is that very computation:
``a = F.silu(gate)`` (or ``F.gelu``) in the model's dtype (ATen upcasts bf16/fp16 to fp32,
computes, rounds), ``out = a * up`` (rounded again), and the backward is what autograd of
``act(gate) * up`` computes. Counting looks at ``a``, the value the model itself produces.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import checks
from .checks import ACTIVATIONS  # noqa: F401 - re-exported: the oracle names its activations

_APPROXIMATE = {"gelu_tanh": "tanh", "gelu": "none"}


def act(gate: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) exactly as the module's act_fn computes it (ATen, in gate's dtype)."""
    checks.check_activation(activation)
    if activation == "silu":
        return F.silu(gate)
    return F.gelu(gate, approximate=_APPROXIMATE[activation])


def act_backward(grad: torch.Tensor, gate: torch.Tensor, activation: str) -> torch.Tensor:
    """grad * act'(gate) exactly as autograd computes it (ATen's silu/gelu backward)."""
    checks.check_activation(activation)
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, gate)
    return torch.ops.aten.gelu_backward(grad, gate, approximate=_APPROXIMATE[activation])


def act_mul(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    checks.act_mul_args(gate, up, activation)
    return act(gate, activation) * up


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
    a = act(gate, activation)
    over_zero = torch.zeros(num_langs, I, dtype=torch.int64, device=gate.device)
    act_sum = torch.zeros(num_langs, I, dtype=torch.float64, device=gate.device)
    for k in range(num_langs):
        rows = token_lang == k
        over_zero[k] = (a[rows] > 0).sum(0, dtype=torch.int64)
        act_sum[k] = a[rows].double().sum(0)
    return a * up, over_zero, act_sum


def gate_up_act_mul_count(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    activation: str,
    token_lang: Optional[torch.Tensor],
    num_langs: int,
):
    """act_mul_count of the projections gate = x w_gate^T, up = x w_up^T in x's dtype (fp32
    accumulation, rounded to the dtype as the module's nn.Linear output is). The GEMM's summation
    order is not part of the contract (kernels differ from this by GEMM rounding, so a count may
    differ only where |gate| is within that rounding of 0)."""
    checks.gate_up_act_mul_count_args(x, w_gate, w_up, activation, token_lang, num_langs)
    return act_mul_count(x @ w_gate.T, x @ w_up.T, activation, token_lang, num_langs)


def _backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str):
    """Autograd of act(gate) * up for the gradient dh: (grad_gate, grad_up, a)."""
    dh = dh.contiguous()  # as a linear layer's backward hands it over
    a = act(gate, activation)
    return act_backward(dh * up, gate, activation), dh * a, a


def act_mul_backward(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str):
    checks.act_mul_backward_args(grad_out, gate, up, activation)
    grad_gate, grad_up, _ = _backward(grad_out, gate, up, activation)
    return grad_gate, grad_up


def act_mul_split(gate: torch.Tensor, up: torch.Tensor, activation: str, sel: torch.Tensor,
                  slots: Optional[torch.Tensor] = None):
    """``slots`` (ops.sel_slots(sel, I)) spares the GPU kernels a check of sel; no effect here."""
    checks.act_mul_split_args(gate, up, activation, sel, slots)
    h = act(gate, activation) * up
    return h.index_fill(1, sel, 0.0), h[:, sel].contiguous()


def act_mul_backward_split(
    grad_out: torch.Tensor,
    grad_out_sel: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str,
    sel: torch.Tensor,
    slots: Optional[torch.Tensor] = None,
):
    checks.act_mul_backward_split_args(grad_out, grad_out_sel, gate, up, activation, sel, slots)
    dh = grad_out.contiguous().index_copy(1, sel, grad_out_sel)
    g, u, a = _backward(dh, gate, up, activation)
    return (
        g.index_fill(1, sel, 0.0),
        u.index_fill(1, sel, 0.0),
        g[:, sel].contiguous(),
        u[:, sel].contiguous(),
        (a * up)[:, sel].contiguous(),
    )
