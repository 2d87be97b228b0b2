"""Python entry points of the ``lape_kernels`` custom ops (schemas: docs/ARCHITECTURE.md).

Each function calls ``torch.ops.lape_kernels.<name>``, so the dispatcher picks the kernel: the
C++ CPU kernels (always built), the CUDA C++ kernels (when the build had CUDA) or the Triton
kernels (registered here for the CUDA key, see :func:`use_cuda_backend`). This module also gives
every op a fake (meta) implementation, so ``torch.compile`` can trace it, and autograd formulas
for the differentiable ones (``act_mul``, ``act_mul_count``, ``act_mul_split``).
``gate_up_act_mul_count`` (the projections fused with the count) is inference-only: its autograd
formula raises a clear error if a gradient ever reaches it.

Importing it never imports Triton on a machine without CUDA.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import checks

try:
    from .. import _C  # noqa: F401 - defines the op schemas and loads the CPU kernels
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        f"lape_kernels: the compiled extension lape_kernels._C could not be loaded ({exc}). "
        "Build it with `make build` (or `python -m pip install --no-build-isolation --no-deps -e .` "
        "in the repository root)."
    ) from exc

__all__ = [
    "act_mul",
    "act_mul_count",
    "act_mul_backward",
    "act_mul_split",
    "act_mul_backward_split",
    "gate_up_act_mul_count",
    "sel_slots",
    "use_cuda_backend",
    "current_cuda_backend",
    "cpu_kernels",
    "CUDA_BACKENDS",
]

_ops = torch.ops.lape_kernels
# Every op and the module (under lape_kernels) holding its Triton kernel.
_TRITON_MODULES = {
    "act_mul": "triton_elementwise",
    "act_mul_count": "triton_elementwise",
    "act_mul_backward": "triton_elementwise",
    "act_mul_split": "triton_elementwise",
    "act_mul_backward_split": "triton_elementwise",
    "gate_up_act_mul_count": "triton_gemm",
}
_OP_NAMES = tuple(_TRITON_MODULES)

#: Which compiled CPU kernel module is in use: "avx512", "avx2" or "default".
cpu_kernels: str = _C.cpu_kernels


# ------------------------------------------------------------------------------ entry points --


def act_mul(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    """``act(gate) * up`` in one pass (differentiable)."""
    return _ops.act_mul(gate, up, activation)


def act_mul_count(
    gate: Tensor, up: Tensor, activation: str, token_lang: Optional[Tensor], num_langs: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(act(gate) * up, over_zero [num_langs, I] int64, act_sum [num_langs, I] float64)``."""
    return _ops.act_mul_count(gate, up, activation, token_lang, num_langs)


def act_mul_backward(grad_out: Tensor, gate: Tensor, up: Tensor, activation: str) -> Tuple[Tensor, Tensor]:
    """``(grad_gate, grad_up)`` of ``act_mul``."""
    return _ops.act_mul_backward(grad_out, gate, up, activation)


def act_mul_split(gate: Tensor, up: Tensor, activation: str, sel: Tensor,
                  slots: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(h with columns sel zeroed, h[:, sel])`` for ``h = act(gate) * up`` (differentiable).

    ``slots = sel_slots(sel, I)``, computed once per neuron set, spares the GPU kernels checking
    sel (a device-to-host sync) and rebuilding the slot map on every call."""
    return _ops.act_mul_split(gate, up, activation, sel, slots)


def act_mul_backward_split(
    grad_out: Tensor, grad_out_sel: Tensor, gate: Tensor, up: Tensor, activation: str, sel: Tensor,
    slots: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(grad_gate, grad_up, grad_gate_sel, grad_up_sel, out_sel)``; see docs/ARCHITECTURE.md."""
    return _ops.act_mul_backward_split(grad_out, grad_out_sel, gate, up, activation, sel, slots)


def sel_slots(sel: Tensor, intermediate: int) -> Tensor:
    """The slot map of a selection, for act_mul_split / act_mul_backward_split: int32 [I] on
    sel's device, ``slots[sel[j]] = j`` and -1 elsewhere. Checks sel (1-D int64, sorted, unique,
    in [0, I)) once: the split ops given it skip that check on GPUs. The kernels never write
    outside their outputs whatever the map holds, so a stale one gives wrong values, never a
    memory error."""
    checks.check_sel(sel, sel.device)
    checks.check_sel_values(sel, intermediate)
    slots = torch.full((intermediate,), -1, dtype=torch.int32, device=sel.device)
    return slots.scatter_(0, sel, torch.arange(sel.shape[0], dtype=torch.int32, device=sel.device))


def gate_up_act_mul_count(
    x: Tensor, w_gate: Tensor, w_up: Tensor, activation: str, token_lang: Optional[Tensor], num_langs: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """``act_mul_count`` of ``gate = x @ w_gate.T``, ``up = x @ w_up.T`` (fp32, never rounded).

    ``x [T, H]``, ``w_gate``/``w_up [I, H]``; returns ``(out [T, I] in x.dtype, over_zero int64
    [num_langs, I], act_sum float64 [num_langs, I])``. On CUDA with the Triton backend gate/up
    never leave the GEMM's registers. Inference only (not differentiable).
    """
    return _ops.gate_up_act_mul_count(x, w_gate, w_up, activation, token_lang, num_langs)


# ------------------------------------------------------------------------------------ fakes --
# The kernels' argument checks (checks.py: same messages on every backend) minus those that read
# tensor data, so errors surface while tracing too; outputs are fresh contiguous tensors.


@torch.library.register_fake("lape_kernels::act_mul")
def _act_mul_fake(gate, up, activation):
    checks.act_mul_args(gate, up, activation)
    return gate.new_empty(gate.shape)


@torch.library.register_fake("lape_kernels::act_mul_count")
def _act_mul_count_fake(gate, up, activation, token_lang, num_langs):
    checks.act_mul_count_args(gate, up, activation, token_lang, num_langs)
    I = gate.shape[1]
    return (
        gate.new_empty(gate.shape),
        gate.new_empty((num_langs, I), dtype=torch.int64),
        gate.new_empty((num_langs, I), dtype=torch.float64),
    )


@torch.library.register_fake("lape_kernels::gate_up_act_mul_count")
def _gate_up_act_mul_count_fake(x, w_gate, w_up, activation, token_lang, num_langs):
    checks.gate_up_act_mul_count_args(x, w_gate, w_up, activation, token_lang, num_langs)
    T, I = x.shape[0], w_gate.shape[0]
    return (
        x.new_empty((T, I)),
        x.new_empty((num_langs, I), dtype=torch.int64),
        x.new_empty((num_langs, I), dtype=torch.float64),
    )


@torch.library.register_fake("lape_kernels::act_mul_backward")
def _act_mul_backward_fake(grad_out, gate, up, activation):
    checks.act_mul_backward_args(grad_out, gate, up, activation)
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


@torch.library.register_fake("lape_kernels::act_mul_split")
def _act_mul_split_fake(gate, up, activation, sel, slots=None):
    checks.act_mul_split_args(gate, up, activation, sel, slots, values=False)
    return gate.new_empty(gate.shape), gate.new_empty((gate.shape[0], sel.shape[0]))


@torch.library.register_fake("lape_kernels::act_mul_backward_split")
def _act_mul_backward_split_fake(grad_out, grad_out_sel, gate, up, activation, sel, slots=None):
    checks.act_mul_backward_split_args(grad_out, grad_out_sel, gate, up, activation, sel, slots, values=False)
    T, k = gate.shape[0], sel.shape[0]
    full = lambda: gate.new_empty(gate.shape)  # noqa: E731
    part = lambda: gate.new_empty((T, k))  # noqa: E731
    return full(), full(), part(), part(), part()


# --------------------------------------------------------------------------------- autograd --
# The backward ops recompute act(gate) from the saved inputs: nothing [T, I] beyond gate and up
# is kept alive, exactly as a plain `act(gate) * up` would keep them.


def _setup_gate_up(ctx, inputs, output):
    gate, up, activation = inputs[0], inputs[1], inputs[2]
    ctx.save_for_backward(gate, up)
    ctx.activation = activation


def _act_mul_bw(ctx, grad_out):
    gate, up = ctx.saved_tensors
    grad_gate, grad_up = _ops.act_mul_backward(grad_out, gate, up, ctx.activation)
    return grad_gate, grad_up, None


def _act_mul_count_setup(ctx, inputs, output):
    _setup_gate_up(ctx, inputs, output)
    ctx.mark_non_differentiable(output[1], output[2])


def _act_mul_count_bw(ctx, grad_out, _grad_over_zero, _grad_act_sum):
    gate, up = ctx.saved_tensors
    grad_gate, grad_up = _ops.act_mul_backward(grad_out, gate, up, ctx.activation)
    return grad_gate, grad_up, None, None, None


def _act_mul_split_setup(ctx, inputs, output):
    gate, up, activation, sel, slots = inputs
    ctx.save_for_backward(gate, up, sel, slots)
    ctx.activation = activation


def _act_mul_split_bw(ctx, grad_out, grad_out_sel):
    gate, up, sel, slots = ctx.saved_tensors
    grad_gate, grad_up, grad_gate_sel, grad_up_sel, _ = _ops.act_mul_backward_split(
        grad_out, grad_out_sel, gate, up, ctx.activation, sel, slots
    )
    # Columns sel are zero in the full gradients (fresh tensors): fill them with the selected part.
    return grad_gate.index_copy_(1, sel, grad_gate_sel), grad_up.index_copy_(1, sel, grad_up_sel), None, None, None


def _gate_up_count_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])


def _gate_up_count_bw(ctx, grad_out, _grad_over_zero, _grad_act_sum):
    # The op exists to avoid materialising gate/up, which a backward would need. Registering
    # this (instead of nothing) turns PyTorch's silent "no autograd kernel" fallback, which
    # would return no gradient with a warning, into an error.
    raise RuntimeError(
        "lape_kernels::gate_up_act_mul_count is not differentiable (inference-only LAPE counting); "
        "for training compute gate/up with the linear layers and use act_mul / act_mul_count"
    )


torch.library.register_autograd("lape_kernels::act_mul", _act_mul_bw, setup_context=_setup_gate_up)
torch.library.register_autograd("lape_kernels::act_mul_count", _act_mul_count_bw, setup_context=_act_mul_count_setup)
torch.library.register_autograd("lape_kernels::act_mul_split", _act_mul_split_bw, setup_context=_act_mul_split_setup)
torch.library.register_autograd(
    "lape_kernels::gate_up_act_mul_count", _gate_up_count_bw, setup_context=_gate_up_count_setup
)


# --------------------------------------------------------------------- CUDA backend choice --

#: The CUDA backends :func:`use_cuda_backend` accepts.
CUDA_BACKENDS = ("cuda", "triton")
_ENV_VAR = "LAPE_KERNELS_CUDA_BACKEND"

# Whether the CUDA C++ kernels were compiled in (checked before any Triton registration).
_HAS_CUDA_CPP: bool = torch._C._dispatch_has_kernel_for_dispatch_key("lape_kernels::act_mul", "CUDA")
_triton_lib: Optional[torch.library.Library] = None


def _register_triton() -> None:
    """Register the Triton kernels for the CUDA key (over the C++ ones, if any)."""
    global _triton_lib
    if _triton_lib is not None:
        return
    import importlib

    # lazy: these import triton
    modules = {m: importlib.import_module(f".{m}", __package__) for m in sorted(set(_TRITON_MODULES.values()))}
    lib = torch.library.Library("lape_kernels", "IMPL")
    try:
        with warnings.catch_warnings():
            # Replacing the C++ CUDA kernel is the point; PyTorch warns about it.
            warnings.filterwarnings("ignore", message=r"(?s).*Overriding a previously registered kernel")
            warnings.filterwarnings("ignore", message=r"(?s).*Warning only once for all operators")
            for name in _OP_NAMES:
                lib.impl(name, getattr(modules[_TRITON_MODULES[name]], name), "CUDA")
    except BaseException:
        lib._destroy()
        raise
    _triton_lib = lib


def _unregister_triton() -> None:
    """Drop the Triton registration; the dispatcher falls back to the C++ CUDA kernels."""
    global _triton_lib
    if _triton_lib is not None:
        _triton_lib._destroy()
        _triton_lib = None


def current_cuda_backend() -> str:
    """The backend CUDA tensors run on: ``"cuda"`` (C++ kernels) or ``"triton"``."""
    return "cuda" if _HAS_CUDA_CPP and _triton_lib is None else "triton"


def use_cuda_backend(name: str) -> str:
    """Select the kernels CUDA tensors use: ``"cuda"`` (compiled C++) or ``"triton"``.

    Selecting ``"cuda"`` when the C++ CUDA kernels were not compiled in raises RuntimeError.
    Returns the backend now in use.
    """
    if name not in CUDA_BACKENDS:
        raise ValueError(f"CUDA backend must be one of {CUDA_BACKENDS}, got {name!r}")
    if name == "cuda":
        if not _HAS_CUDA_CPP:
            raise RuntimeError(
                "the CUDA C++ kernels are not compiled in (this build of torch has no CUDA, or nvcc "
                "was not found at build time); use the 'triton' backend or rebuild with `make build`"
            )
        _unregister_triton()
    else:
        _register_triton()
    return current_cuda_backend()


def _select_at_import() -> None:
    """Honour LAPE_KERNELS_CUDA_BACKEND; use Triton automatically when the C++ CUDA kernels are absent."""
    wanted = os.environ.get(_ENV_VAR, "").strip().lower()
    if wanted not in ("",) + CUDA_BACKENDS:
        warnings.warn(f"{_ENV_VAR}={wanted!r} is not one of {CUDA_BACKENDS}; ignoring it", stacklevel=2)
        wanted = ""
    if wanted == "cuda" and not _HAS_CUDA_CPP:
        warnings.warn(f"{_ENV_VAR}=cuda but the CUDA C++ kernels are not compiled in; using Triton", stacklevel=2)
    if not torch.cuda.is_available():
        return  # no CUDA tensors can exist: leave Triton unimported
    if wanted == "triton" or not _HAS_CUDA_CPP:
        try:
            _register_triton()
        except Exception as exc:  # keep the CPU ops (and the C++ CUDA ones) usable
            warnings.warn(f"lape_kernels: could not register the Triton kernels for CUDA ({exc!r})", stacklevel=2)


_select_at_import()
