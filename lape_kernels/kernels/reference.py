"""Plain-PyTorch reference implementations of every ``lape_kernels`` op.

These are the test oracle: written for clarity, not speed, with the same names, signatures and
semantics as the compiled ops (see docs/ARCHITECTURE.md). Arithmetic is float32, results are
rounded once to the input dtype, exactly as the kernels are specified to do.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_gate_up(gate: torch.Tensor, up: torch.Tensor, name_gate: str = "gate", name_up: str = "up") -> None:
    """The argument checks every op shares (same messages on every backend)."""
    for name, t in ((name_gate, gate), (name_up, up)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [tokens, intermediate], got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if gate.shape != up.shape:
        raise ValueError(f"{name_gate} and {name_up} must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise ValueError(f"{name_gate} and {name_up} must have the same dtype, got {gate.dtype} and {up.dtype}")
    if gate.device != up.device:
        raise ValueError(f"{name_gate} and {name_up} must be on the same device, got {gate.device} and {up.device}")


def check_gemm_inputs(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> None:
    """Argument checks of gate_up_act_mul_count (same messages on every backend)."""
    for name, t, dims in (("x", x, "[tokens, hidden]"), ("w_gate", w_gate, "[intermediate, hidden]"),
                          ("w_up", w_up, "[intermediate, hidden]")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D {dims}, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate and w_up must have the same shape, got {tuple(w_gate.shape)} and {tuple(w_up.shape)}")
    if x.shape[1] != w_gate.shape[1]:
        raise ValueError(
            f"x and w_gate must have the same hidden size (dim 1), got {tuple(x.shape)} and {tuple(w_gate.shape)}"
        )
    if not (x.dtype == w_gate.dtype == w_up.dtype):
        raise ValueError(f"x, w_gate and w_up must have the same dtype, got {x.dtype}, {w_gate.dtype} and {w_up.dtype}")
    if not (x.device == w_gate.device == w_up.device):
        raise ValueError(
            f"x, w_gate and w_up must be on the same device, got {x.device}, {w_gate.device} and {w_up.device}"
        )


def check_count_args(num_tokens: int, device: torch.device, token_lang: Optional[torch.Tensor],
                     num_langs: int) -> None:
    """``num_langs`` and ``token_lang`` of the counting ops (same messages on every backend)."""
    if num_langs < 1:
        raise ValueError(f"num_langs must be >= 1, got {num_langs}")
    if token_lang is None:
        return
    if token_lang.dim() != 1 or token_lang.shape[0] != num_tokens or token_lang.dtype != torch.int64:
        raise ValueError(
            f"token_lang must be int64 of shape [{num_tokens}], got {token_lang.dtype} of shape {tuple(token_lang.shape)}"
        )
    if token_lang.device != device:
        raise ValueError(f"token_lang must be on {device}, got {token_lang.device}")


def check_gate_up_count_args(x, w_gate, w_up, activation: str, token_lang: Optional[torch.Tensor],
                             num_langs: int) -> None:
    """Every argument check of gate_up_act_mul_count but the kernels' last-dim contiguity."""
    check_gemm_inputs(x, w_gate, w_up)
    check_activation(activation)
    check_count_args(x.shape[0], x.device, token_lang, num_langs)


def check_sel(sel: torch.Tensor, intermediate: int, device: torch.device) -> None:
    if sel.dim() != 1 or sel.dtype != torch.int64:
        raise ValueError(f"sel must be a 1-D int64 tensor, got {sel.dtype} of shape {tuple(sel.shape)}")
    if sel.device != device:
        raise ValueError(f"sel must be on {device}, got {sel.device}")
    if sel.numel() > 0:
        if int(sel.min()) < 0 or int(sel.max()) >= intermediate:
            raise ValueError(f"sel values must be in [0, {intermediate}), got range [{int(sel.min())}, {int(sel.max())}]")
        if sel.numel() > 1 and not bool((sel[1:] > sel[:-1]).all()):
            raise ValueError("sel must be sorted ascending and unique")


def act_fp32(gate: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) in float32."""
    check_activation(activation)
    g = gate.float()
    if activation == "silu":
        return g * torch.sigmoid(g)
    if activation == "gelu_tanh":
        return 0.5 * g * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)))
    return 0.5 * g * (1.0 + torch.erf(g * _INV_SQRT_2))


def act_grad_fp32(gate: torch.Tensor, activation: str) -> torch.Tensor:
    """d act / d gate in float32."""
    check_activation(activation)
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
    check_gate_up(gate, up)
    return (act_fp32(gate, activation) * up.float()).to(gate.dtype)


def act_mul_count(
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str,
    token_lang: Optional[torch.Tensor],
    num_langs: int,
):
    check_gate_up(gate, up)
    T, I = gate.shape
    check_count_args(T, gate.device, token_lang, num_langs)
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
    check_gate_up_count_args(x, w_gate, w_up, activation, token_lang, num_langs)
    gate = x.float() @ w_gate.float().T
    up = x.float() @ w_up.float().T
    out, over_zero, act_sum = act_mul_count(gate, up, activation, token_lang, num_langs)
    return out.to(x.dtype), over_zero, act_sum


def act_mul_backward(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str):
    check_gate_up(gate, up)
    check_gate_up(grad_out, gate, "grad_out", "gate")
    go = grad_out.float()
    grad_gate = go * up.float() * act_grad_fp32(gate, activation)
    grad_up = go * act_fp32(gate, activation)
    return grad_gate.to(gate.dtype), grad_up.to(gate.dtype)


def act_mul_split(gate: torch.Tensor, up: torch.Tensor, activation: str, sel: torch.Tensor):
    check_gate_up(gate, up)
    check_sel(sel, gate.shape[1], gate.device)
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
    check_gate_up(gate, up)
    check_gate_up(grad_out, gate, "grad_out", "gate")
    check_sel(sel, gate.shape[1], gate.device)
    if grad_out_sel.shape != (gate.shape[0], sel.shape[0]):
        raise ValueError(
            f"grad_out_sel must have shape {(gate.shape[0], sel.shape[0])}, got {tuple(grad_out_sel.shape)}"
        )
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
