"""Per-instance model surgery: route each decoder layer's gated MLP through our ops.

Like Liger-Kernel's instance patching, we keep every submodule and weight and only swap the
``forward`` of the MLP *instances* (an instance attribute shadows the class method, so
``del mlp.forward`` restores the original exactly). Classes are never patched globally, so an
unpatched model in the same process is unaffected.

The patched forward is the single mechanism that counting (``record``), neuron deactivation
(``deactivate``) and sparse neuron training plug into, through ``mlp._lape``
(:class:`PatchedMLPState`): a :class:`Recorder`, deactivated indices, or an
:class:`MLPOverride`. What they install elsewhere on the model they undo through
:func:`add_cleanup`, so :func:`unpatch` removes everything without knowing the consumers.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Protocol, Tuple

import torch
from torch import nn

from .introspection import MLPFamily, discover, mlp_modules, text_config

__all__ = [
    "PatchedMLPState",
    "Recorder",
    "MLPOverride",
    "patch_mlps",
    "unpatch",
    "is_patched",
    "patched_mlps",
    "add_cleanup",
    "drop_cleanup",
    "run_cleanup",
    "gate_up",
    "weights",
    "biases",
]


class Recorder(Protocol):
    """What ``record`` plugs into the patched forward (``lape_kernels.stats.recorder``).

    Per MLP call, the forward asks ``token_lang`` which language each of the call's tokens
    belongs to, computes the counts with ``act_mul_count`` (or, when ``fused_gemm`` is set and
    applies, ``gate_up_act_mul_count``) and hands them to ``accumulate``."""

    #: count with the fused gate/up GEMM op where it computes what the module computes
    fused_gemm: bool

    def token_lang(self, num_tokens: int, device: torch.device) -> Tuple[Optional[torch.Tensor], int]:
        """(int64 [num_tokens] language ids on ``device`` with -1 = not counted, or None = all
        language 0; the number of languages)."""
        ...

    def accumulate(self, layer_index: int, over_zero: torch.Tensor, act_sum: torch.Tensor) -> None:
        """Add one call's ``over_zero`` int64 / ``act_sum`` float64 ``[num_langs, I]``."""
        ...


class MLPOverride(Protocol):
    """A replacement for the whole MLP computation (sparse neuron training:
    ``lape_kernels.training.sparse_mlp``). Counting and deactivation do not apply to it."""

    def forward(self, mlp: nn.Module, x2: torch.Tensor) -> torch.Tensor:
        """The MLP output ``[T, H]`` for the flattened input ``x2`` ``[T, H]``."""
        ...


@dataclass
class PatchedMLPState:
    """Everything the patched forward of one MLP needs. Plain Python (never in state_dict)."""

    layer_index: int
    activation: str
    family: MLPFamily
    recorder: Optional[Recorder] = None
    # set by ``deactivate``: int64 indices whose act(gate)*up is zeroed
    deactivated: Optional[torch.Tensor] = None
    # set by sparse training
    sparse: Optional[MLPOverride] = None


def gate_up(mlp: nn.Module, x2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """gate and up projections of ``x2`` [T, H] through the (frozen) base weights."""
    return mlp._lape.family.gate_up(mlp, x2)


def weights(mlp: nn.Module) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Wg [I, H], Wu [I, H], Wd [H, I]) of a patched MLP, as views of its weights."""
    return mlp._lape.family.weights(mlp)


def biases(mlp: nn.Module) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    return mlp._lape.family.biases(mlp)


def _fused_gemm_applies(mlp: nn.Module, x2: torch.Tensor) -> bool:
    """Whether ``gate_up_act_mul_count`` computes this MLP's forward exactly as the module would
    up to GEMM rounding: no gate/up bias, the weights' dtype (no autocast cast), and nothing
    that needs a gradient through the op (it is inference-only)."""
    wg, wu, _ = weights(mlp)
    bg, bu, _ = biases(mlp)
    if bg is not None or bu is not None or x2.dtype != wg.dtype or torch.is_autocast_enabled(x2.device.type):
        return False
    return not (torch.is_grad_enabled() and (x2.requires_grad or wg.requires_grad or wu.requires_grad))


def _lape_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The patched MLP forward: act(gate) * up in one fused op (+ LAPE counting when recording)."""
    from .kernels import ops  # imported lazily so that patching metadata works without the extension

    st: PatchedMLPState = self._lape
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if st.sparse is not None:
        out = st.sparse.forward(self, x2)
        return out.reshape(*shape[:-1], out.shape[-1])
    if st.recorder is not None:
        token_lang, num_langs = st.recorder.token_lang(x2.shape[0], x2.device)
        if st.recorder.fused_gemm and _fused_gemm_applies(self, x2):
            wg, wu, _ = weights(self)
            h, over_zero, act_sum = ops.gate_up_act_mul_count(x2, wg, wu, st.activation, token_lang, num_langs)
        else:
            gate, up = gate_up(self, x2)
            h, over_zero, act_sum = ops.act_mul_count(gate, up, st.activation, token_lang, num_langs)
        st.recorder.accumulate(st.layer_index, over_zero, act_sum)
    else:
        gate, up = gate_up(self, x2)
        h = ops.act_mul(gate, up, st.activation)
    if st.deactivated is not None:
        h = h.index_fill(1, st.deactivated, 0.0)
    out = st.family.down(self, h)
    return out.reshape(*shape[:-1], out.shape[-1])


def is_patched(model: nn.Module) -> bool:
    return bool(getattr(model, "_lape_patched", False))


def patched_mlps(model: nn.Module) -> List[nn.Module]:
    """The patched MLP modules in layer order (error if the model is not patched)."""
    if not is_patched(model):
        raise RuntimeError("model is not patched: call lape_kernels.patch(model) first")
    return mlp_modules(model)


def patch_mlps(model: nn.Module) -> nn.Module:
    """Route ``model``'s MLPs through the lape_kernels ops (in place, idempotent; returns ``model``).

    The MLPs are found by structure and each is proven, by running its own forward on a small
    random input, to compute ``down(act(gate) * up)`` (``introspection.discover``) before the
    first change: an unsupported model is left untouched and the error says why. The probe is a
    safety net for models the test matrix never saw (a few tokens per layer, once per patch).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects a torch.nn.Module, got {type(model).__name__}")
    if is_patched(model):
        return model
    found = discover(model, probe=True)
    for mlp in found.mlps:
        if getattr(mlp.module, "_lape", None) is None:
            mlp.module._lape = PatchedMLPState(layer_index=mlp.layer_index, activation=mlp.activation,
                                               family=mlp.family)
            mlp.module.forward = types.MethodType(_lape_mlp_forward, mlp.module)
    model._lape_patched = True
    return model


#: ``model.__dict__`` key of the registered cleanups: name -> undo(model), in registration order
_CLEANUPS = "_lape_cleanups"


def add_cleanup(model: nn.Module, name: str, undo: Callable[[nn.Module], Any]) -> None:
    """Register ``undo(model)`` to run (once, newest first) when ``model`` is unpatched.

    How the consumers of the patched forward (sparse training, the chunked loss) remove what
    they installed, without patching having to know them. Registering a name again replaces
    the earlier ``undo`` and makes it the newest."""
    cleanups = model.__dict__.setdefault(_CLEANUPS, {})
    cleanups.pop(name, None)
    cleanups[name] = undo


def drop_cleanup(model: nn.Module, name: str) -> None:
    """Forget a registered cleanup without running it (its owner undid its work itself)."""
    model.__dict__.get(_CLEANUPS, {}).pop(name, None)


def run_cleanup(model: nn.Module, name: str) -> None:
    """Run and forget one registered cleanup now (no-op when none is registered)."""
    undo = model.__dict__.get(_CLEANUPS, {}).pop(name, None)
    if undo is not None:
        undo(model)


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: original forwards, original weights, original ``requires_grad`` flags.

    Trained neuron values are discarded (use ``lape_kernels.merge`` to keep them).
    """
    for name in reversed(list(model.__dict__.get(_CLEANUPS, {}))):
        run_cleanup(model, name)
    model.__dict__.pop(_CLEANUPS, None)
    if not is_patched(model):
        return model
    for mlp in mlp_modules(model):
        if "forward" in mlp.__dict__:
            del mlp.forward
        if "_lape" in mlp.__dict__:
            del mlp._lape
    del model._lape_patched
    return model
