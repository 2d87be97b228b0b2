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

Patching also installs, once, forward hooks on the decoder body and the modules enclosing it
that tell the active recorder (:func:`set_recorder`) where a forward starts and ends. They stay
for the life of the patch: hooks registered per ``record()`` block would get new ids, which
``torch.compile`` guards on, so every block would recompile.

Every function here takes the model or any wrapper around it (PEFT, DDP, ``torch.compile``:
:mod:`lape_kernels.wrappers`) and acts on the Hugging Face model inside.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Protocol, Tuple

import torch
from torch import nn

from .experts_forward import PatchedExpertsState, lape_experts_forward
from .introspection import MLPFamily, UnsupportedModelError, decoder_layers, discover
from .wrappers import describe_adapters, mlp_adapters, unsharded, unwrap

__all__ = [
    "PatchedMLPState",
    "PatchedModelState",
    "Recorder",
    "MLPOverride",
    "patch_mlps",
    "unpatch",
    "is_patched",
    "patched_mlps",
    "patched_experts",
    "observed_modules",
    "set_recorder",
    "is_recording",
    "check_not_recording",
    "check_no_mlp_adapters",
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

    def accumulate_experts(self, moe_index: int, over_zero: torch.Tensor, act_sum: torch.Tensor,
                           routed: torch.Tensor) -> None:
        """Add one experts call's ``over_zero`` / ``act_sum`` ``[num_langs, E, I_e]`` (over the
        tokens routed to each expert) and ``routed`` int64 ``[num_langs, E]`` (``experts_forward``)."""
        ...

    # Model level (only when installed with ``set_recorder``; a recorder set on one MLP's
    # ``_lape.recorder`` by hand, e.g. in a benchmark, never sees these):
    def enter(self, position: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A forward of ``observed_modules(model)[position]`` starts (the last position is the
        decoder body; the others enclose it, outermost first)."""
        ...

    def exit(self, position: int, module: nn.Module) -> None:
        """That forward ended (also when it raised)."""
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
    up to GEMM rounding: no gate/up bias, the weights' dtype (no autocast cast), nothing that
    needs a gradient through the op (it is inference-only), and plain Linear projections (an
    adapter layer adds to the base weight's product: the module call includes it, the op would
    not)."""
    if mlp_adapters(mlp):
        return False
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


@dataclass
class PatchedModelState:
    """``model._lape_model``: what patching installed on the model as a whole. Plain Python."""

    #: the decoder body and the modules enclosing it, outermost first (the root model included)
    observed: List[nn.Module]
    #: the patched MLP modules in layer order
    mlps: List[nn.Module]
    #: the patched experts modules of the mixture-of-experts layers, in layer order
    experts: List[nn.Module] = field(default_factory=list)
    #: the forward-hook handles on ``observed`` (removed by ``unpatch``)
    handles: list = field(default_factory=list)
    #: the active model-level recorder (``set_recorder``)
    recorder: Optional[Recorder] = None


class _ForwardObserver:
    """Forward pre/post hooks of one observed module: hand the forward's start and end to the
    model's active recorder. A bound method of an object (not a closure), so that
    ``copy.deepcopy(model)`` gives the copy hooks that point at the copy's state."""

    def __init__(self, state: PatchedModelState, position: int) -> None:
        self.state = state
        self.position = position

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        recorder = self.state.recorder
        if recorder is not None:
            recorder.enter(self.position, module, args, kwargs)

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        recorder = self.state.recorder
        if recorder is not None:
            recorder.exit(self.position, module)


def _ancestors(model: nn.Module, body: nn.Module) -> List[nn.Module]:
    """The modules enclosing ``body`` inside ``model`` (``model`` included, ``body`` not)."""
    for name, module in model.named_modules():
        if module is body:
            parts = name.split(".") if name else []
            out, cur = [], model
            for part in parts[:-1]:
                cur = getattr(cur, part)
                out.append(cur)
            return ([model] if name else []) + out
    return []


def is_patched(model: nn.Module) -> bool:
    return bool(getattr(unwrap(model), "_lape_patched", False))


def patched_mlps(model: nn.Module) -> List[nn.Module]:
    """The patched MLP modules in layer order (error if the model is not patched)."""
    model = unwrap(model)
    if not is_patched(model):
        raise RuntimeError("model is not patched: call lape_kernels.patch(model) first")
    return list(model._lape_model.mlps)


def patched_experts(model: nn.Module) -> List[nn.Module]:
    """The patched experts modules of the mixture-of-experts layers in layer order (empty for a
    dense model; error if the model is not patched). Each has ``_lape`` (PatchedExpertsState)."""
    model = unwrap(model)
    if not is_patched(model):
        raise RuntimeError("model is not patched: call lape_kernels.patch(model) first")
    return list(model._lape_model.experts)


def observed_modules(model: nn.Module) -> List[nn.Module]:
    """The decoder body (last) and the modules enclosing it, whose forwards a recorder set with
    :func:`set_recorder` is told about."""
    model = unwrap(model)
    if not is_patched(model):
        raise RuntimeError("model is not patched: call lape_kernels.patch(model) first")
    return list(model._lape_model.observed)


def set_recorder(model: nn.Module, recorder: Optional[Recorder]) -> None:
    """Make ``recorder`` receive every patched MLP's counts and the observed modules' forward
    starts and ends (None: stop). Setting one while another is active is an error."""
    model = unwrap(model)
    mlps = patched_mlps(model)
    state: PatchedModelState = model._lape_model
    if recorder is not None and is_recording(model):
        raise RuntimeError("record(): this model is already being recorded (nested record() on the same model)")
    state.recorder = recorder
    for mlp in mlps + state.experts:
        mlp._lape.recorder = recorder


def is_recording(model: nn.Module) -> bool:
    """Whether a ``record()`` block is counting this model's forwards."""
    model = unwrap(model)
    if not is_patched(model):
        return False
    if model._lape_model.recorder is not None:
        return True
    return any(getattr(mlp, "_lape", None) is not None and mlp._lape.recorder is not None
               for mlp in model._lape_model.mlps + model._lape_model.experts)


def check_not_recording(model: nn.Module, what: str) -> None:
    """Refuse to change what the patched forward computes while a ``record()`` block counts
    it: the statistics would silently mix two computations (or stop counting MLPs while the
    token totals go on)."""
    if is_recording(model):
        raise RuntimeError(
            f"{what}: the model is being recorded (inside a lape_kernels.record() block); "
            "finish the block first, then change the model"
        )


def check_no_mlp_adapters(model: nn.Module, what: str, mlps: Optional[List[nn.Module]] = None) -> None:
    """Refuse MLPs whose projections are adapter layers (PEFT LoRA, ...): counting, deactivation
    and the weight-reading paths compute the MLP from its nn.Linear weights and would leave the
    adapter's contribution out without a word."""
    model = unwrap(model)
    if mlps is None:  # before discovery, which cannot read an adapted MLP: every non-attention child
        try:
            layers = decoder_layers(model)[1]
        except UnsupportedModelError:
            return  # not a model we patch at all: that error is discovery's to give
        mlps = [child for block in layers for name, child in block.named_children()
                if "attn" not in name.lower() and "attention" not in name.lower()]
    found = describe_adapters(model, mlps)
    if found:
        raise UnsupportedModelError(
            f"{what}: the MLP projections {found} are adapter layers (PEFT); lape_kernels computes MLPs from "
            "their nn.Linear weights and would leave the adapter out. Merge the adapter into the weights first "
            "(model = peft_model.merge_and_unload()), or put it on modules outside the MLP "
            "(e.g. LoraConfig(target_modules=['q_proj', 'v_proj']))"
        )


def patch_mlps(model: nn.Module) -> nn.Module:
    """Route ``model``'s MLPs through the lape_kernels ops (in place, idempotent; returns ``model``).

    The MLPs are found by structure and each is proven, by running its own forward on a small
    random input, to compute ``down(act(gate) * up)`` (``introspection.discover``) before the
    first change: an unsupported model is left untouched and the error says why. The probe is a
    safety net for models the test matrix never saw (a few tokens per layer, once per patch).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects a torch.nn.Module, got {type(model).__name__}")
    outer, model = model, unwrap(model)
    if is_patched(model):
        return outer
    check_no_mlp_adapters(model, "patch")
    with unsharded(model):  # FSDP2: the probe multiplies by the full weights
        found = discover(model, probe=True)
    modules = [m.module for m in found.mlps] + [x.module for x in found.experts]
    foreign = [m for m in modules if "forward" in m.__dict__]
    if foreign:
        layers = [m.layer_index for m in list(found.mlps) + list(found.experts) if "forward" in m.module.__dict__]
        fwd = foreign[0].__dict__["forward"]
        fwd = getattr(fwd, "__func__", fwd)
        raise RuntimeError(
            f"patch: the MLPs of layers {layers[:8]}{' ...' if len(layers) > 8 else ''} already have an instance-level "
            f"forward ({getattr(fwd, '__module__', None)}.{getattr(fwd, '__qualname__', type(fwd).__name__)}); "
            "patching would silently replace it. Patch the model before whatever set it, or remove it first"
        )
    for mlp in found.mlps:
        if getattr(mlp.module, "_lape", None) is None:
            mlp.module._lape = PatchedMLPState(layer_index=mlp.layer_index, activation=mlp.activation,
                                               family=mlp.family)
            mlp.module.forward = types.MethodType(_lape_mlp_forward, mlp.module)
    for moe_index, x in enumerate(found.experts):
        if getattr(x.module, "_lape", None) is None:
            x.module._lape = PatchedExpertsState(moe_index, x.layer_index, x.activation, x.num_experts,
                                                 x.intermediate_size)
            x.module.forward = types.MethodType(lape_experts_forward, x.module)
    state = PatchedModelState(observed=_ancestors(model, found.body) + [found.body],
                              mlps=[mlp.module for mlp in found.mlps], experts=[x.module for x in found.experts])
    for position, module in enumerate(state.observed):
        observer = _ForwardObserver(state, position)
        state.handles.append(module.register_forward_pre_hook(observer.pre, with_kwargs=True))
        state.handles.append(module.register_forward_hook(observer.post, with_kwargs=True, always_call=True))
    model._lape_model = state
    model._lape_patched = True
    return outer


#: ``model.__dict__`` key of the registered cleanups: name -> undo(model), in registration order
_CLEANUPS = "_lape_cleanups"


def add_cleanup(model: nn.Module, name: str, undo: Callable[[nn.Module], Any]) -> None:
    """Register ``undo(model)`` to run (once, newest first) when ``model`` is unpatched.

    How the consumers of the patched forward (sparse training, the chunked loss) remove what
    they installed, without patching having to know them. Registering a name again replaces
    the earlier ``undo`` and makes it the newest."""
    cleanups = unwrap(model).__dict__.setdefault(_CLEANUPS, {})
    cleanups.pop(name, None)
    cleanups[name] = undo


def drop_cleanup(model: nn.Module, name: str) -> None:
    """Forget a registered cleanup without running it (its owner undid its work itself)."""
    model = unwrap(model)
    cleanups = model.__dict__.get(_CLEANUPS)
    if cleanups is not None:
        cleanups.pop(name, None)
        if not cleanups:
            del model.__dict__[_CLEANUPS]


def run_cleanup(model: nn.Module, name: str) -> None:
    """Run and forget one registered cleanup now (no-op when none is registered)."""
    model = unwrap(model)
    undo = model.__dict__.get(_CLEANUPS, {}).get(name)
    drop_cleanup(model, name)
    if undo is not None:
        undo(model)


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: original forwards, original weights, original ``requires_grad`` flags.

    Trained neuron values are discarded (use ``lape_kernels.merge`` to keep them). An error
    inside a ``record()`` block. Returns ``model`` (a wrapper stays the wrapper).
    """
    outer, model = model, unwrap(model)
    check_not_recording(model, "unpatch")
    for name in reversed(list(model.__dict__.get(_CLEANUPS, {}))):
        run_cleanup(model, name)
    model.__dict__.pop(_CLEANUPS, None)
    if not is_patched(model):
        return outer
    state = model.__dict__.pop("_lape_model")
    for mlp in state.mlps + state.experts:  # those patched (an adapter added since may hide them from discovery)
        if "forward" in mlp.__dict__:
            del mlp.forward
        if "_lape" in mlp.__dict__:
            del mlp._lape
    for handle in state.handles:
        handle.remove()
    del model._lape_patched
    return outer
