"""The argument checks of every ``lape_kernels`` op: one owner for the error model.

reference.py, the fake (tracing) kernels in ops.py and the Triton kernels call these; the C++
kernels (csrc/common/checks.h) check the same conditions in the same order with the same
messages, so a bad argument raises the same ``ValueError`` text on every backend. Shapes print as
lists (``[4, 6]``) and dtypes as ``torch.float32``, as the C++ side writes them.

Order (first failure wins, on every backend): each of gate/up (2-D, float dtype), their shape /
dtype / device; grad_out against gate; last-dim contiguity of gate and up; the activation; then
the op's own arguments (num_langs / token_lang, sel, grad_out_sel).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..dtypes import FLOAT_DTYPES

__all__ = [
    "ACTIVATIONS",
    "check_activation",
    "check_gate_up",
    "check_rows",
    "check_count_args",
    "check_sel",
    "check_sel_values",
    "check_slots",
    "check_grad_out_sel",
    "check_gemm_inputs",
    "act_mul_args",
    "act_mul_count_args",
    "act_mul_backward_args",
    "act_mul_split_args",
    "act_mul_backward_split_args",
    "gate_up_act_mul_count_args",
]

#: activation names every op accepts (silu; gelu_tanh = Gemma's gelu_pytorch_tanh; gelu = exact erf)
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
_DTYPES = tuple(FLOAT_DTYPES.values())
_GATE_DIMS = "[tokens, intermediate]"


def _shape(t: torch.Tensor) -> list:
    return list(t.shape)


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_float_2d(name: str, t, dims: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D {dims}, got shape {_shape(t)}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_gate_up(gate: torch.Tensor, up: torch.Tensor, name_gate: str = "gate", name_up: str = "up") -> None:
    """Two [T, I] float tensors of one shape, dtype and device (gate/up, or grad_out against gate)."""
    _check_float_2d(name_gate, gate, _GATE_DIMS)
    _check_float_2d(name_up, up, _GATE_DIMS)
    if gate.shape != up.shape:
        raise ValueError(f"{name_gate} and {name_up} must have the same shape, got {_shape(gate)} and {_shape(up)}")
    if gate.dtype != up.dtype:
        raise ValueError(f"{name_gate} and {name_up} must have the same dtype, got {gate.dtype} and {up.dtype}")
    if gate.device != up.device:
        raise ValueError(f"{name_gate} and {name_up} must be on the same device, got {gate.device} and {up.device}")


def check_rows(t: torch.Tensor, name: str) -> None:
    """Kernels read rows through stride(0) with unit column stride (views such as the halves of a
    fused gate_up output qualify; a transposed tensor does not)."""
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride(1) == 1), got strides {list(t.stride())}")


def check_count_args(num_tokens: int, device: torch.device, token_lang: Optional[torch.Tensor], num_langs: int) -> None:
    """``num_langs`` and ``token_lang`` of the counting ops."""
    if num_langs < 1:
        raise ValueError(f"num_langs must be >= 1, got {num_langs}")
    if token_lang is None:
        return
    if token_lang.dim() != 1 or token_lang.shape[0] != num_tokens or token_lang.dtype != torch.int64:
        raise ValueError(
            f"token_lang must be int64 of shape [{num_tokens}], got {token_lang.dtype} of shape {_shape(token_lang)}"
        )
    if token_lang.device != device:
        raise ValueError(f"token_lang must be on {device}, got {token_lang.device}")


def check_sel(sel: torch.Tensor, device: torch.device) -> None:
    """sel's metadata: 1-D int64 on the op's device (values: :func:`check_sel_values`)."""
    if sel.dim() != 1 or sel.dtype != torch.int64:
        raise ValueError(f"sel must be a 1-D int64 tensor, got {sel.dtype} of shape {_shape(sel)}")
    if sel.device != device:
        raise ValueError(f"sel must be on {device}, got {sel.device}")


def check_sel_values(sel: torch.Tensor, intermediate: int) -> None:
    """sel strictly increasing within [0, I): what keeps the kernels' selected-column stores in
    bounds. One device-to-host sync on a GPU."""
    k = sel.shape[0]
    if k == 0:
        return
    bad = (sel[0] < 0) | (sel[-1] >= intermediate)
    if k > 1:
        bad = bad | (sel[1:] <= sel[:-1]).any()
    if bool(bad):
        raise ValueError(f"sel must be sorted ascending and unique, with values in [0, {intermediate})")


def check_slots(slots: torch.Tensor, intermediate: int, device: torch.device) -> None:
    """The split ops' optional slot map (``ops.sel_slots``): int32 [I] on the op's device."""
    if slots.dim() != 1 or slots.dtype != torch.int32 or slots.shape[0] != intermediate:
        raise ValueError(f"slots must be int32 of shape [{intermediate}], got {slots.dtype} of shape {_shape(slots)}")
    if slots.device != device:
        raise ValueError(f"slots must be on {device}, got {slots.device}")


def check_grad_out_sel(grad_out_sel: torch.Tensor, num_tokens: int, k: int, gate: torch.Tensor) -> None:
    if grad_out_sel.dim() != 2 or grad_out_sel.shape[0] != num_tokens or grad_out_sel.shape[1] != k:
        raise ValueError(f"grad_out_sel must have shape [{num_tokens}, {k}], got {_shape(grad_out_sel)}")
    if grad_out_sel.dtype != gate.dtype:
        raise ValueError(f"grad_out_sel must have the dtype of gate ({gate.dtype}), got {grad_out_sel.dtype}")
    if grad_out_sel.device != gate.device:
        raise ValueError(f"grad_out_sel must be on {gate.device}, got {grad_out_sel.device}")


def check_gemm_inputs(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> None:
    """x [T, H], w_gate / w_up [I, H]: one float dtype, one device, unit column stride."""
    _check_float_2d("x", x, "[tokens, hidden]")
    _check_float_2d("w_gate", w_gate, "[intermediate, hidden]")
    _check_float_2d("w_up", w_up, "[intermediate, hidden]")
    if w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate and w_up must have the same shape, got {_shape(w_gate)} and {_shape(w_up)}")
    if x.shape[1] != w_gate.shape[1]:
        raise ValueError(f"x and w_gate must have the same hidden size (dim 1), got {_shape(x)} and {_shape(w_gate)}")
    if not (x.dtype == w_gate.dtype == w_up.dtype):
        raise ValueError(f"x, w_gate and w_up must have the same dtype, got {x.dtype}, {w_gate.dtype} and {w_up.dtype}")
    if not (x.device == w_gate.device == w_up.device):
        raise ValueError(
            f"x, w_gate and w_up must be on the same device, got {x.device}, {w_gate.device} and {w_up.device}"
        )
    for name, t in (("x", x), ("w_gate", w_gate), ("w_up", w_up)):
        check_rows(t, name)


# ------------------------------------------------------------------------------------- per op --
# ``values=False`` skips the checks that read tensor data (sel's values): fake tensors have none.
# The GPU backends skip them too when given ``slots`` (the slot map ops.sel_slots built, checking
# sel once): that check is a device-to-host sync, and the split ops run twice per layer per step.


def act_mul_args(gate, up, activation) -> None:
    check_gate_up(gate, up)
    check_rows(gate, "gate")
    check_rows(up, "up")
    check_activation(activation)


def act_mul_count_args(gate, up, activation, token_lang, num_langs) -> None:
    act_mul_args(gate, up, activation)
    check_count_args(gate.shape[0], gate.device, token_lang, num_langs)


def act_mul_backward_args(grad_out, gate, up, activation) -> None:
    check_gate_up(gate, up)
    check_gate_up(grad_out, gate, "grad_out", "gate")
    check_rows(gate, "gate")
    check_rows(up, "up")
    check_activation(activation)


def _sel_args(gate, sel, slots, values: bool) -> None:
    check_sel(sel, gate.device)
    if slots is not None:
        check_slots(slots, gate.shape[1], gate.device)
    if values:
        check_sel_values(sel, gate.shape[1])


def act_mul_split_args(gate, up, activation, sel, slots=None, *, values: bool = True) -> None:
    act_mul_args(gate, up, activation)
    _sel_args(gate, sel, slots, values)


def act_mul_backward_split_args(grad_out, grad_out_sel, gate, up, activation, sel, slots=None, *,
                                values: bool = True) -> None:
    act_mul_backward_args(grad_out, gate, up, activation)
    _sel_args(gate, sel, slots, values)
    check_grad_out_sel(grad_out_sel, gate.shape[0], sel.shape[0], gate)


def gate_up_act_mul_count_args(x, w_gate, w_up, activation, token_lang, num_langs) -> None:
    check_gemm_inputs(x, w_gate, w_up)
    check_activation(activation)
    check_count_args(x.shape[0], x.device, token_lang, num_langs)
