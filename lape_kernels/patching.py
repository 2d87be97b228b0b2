"""Per-instance model surgery: route each decoder layer's gated MLP through our ops.

Like Liger-Kernel's instance patching, we keep every submodule and weight and only swap the
``forward`` of the MLP *instances* (an instance attribute shadows the class method, so
``del mlp.forward`` restores the original exactly). Classes are never patched globally, so an
unpatched model in the same process is unaffected.

The patched forward is the single mechanism that counting (``record``), neuron deactivation
(``deactivate``) and sparse neuron training plug into, through ``mlp._lape`` state.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

__all__ = [
    "MLPFamily",
    "FAMILIES",
    "PatchedMLPState",
    "UnsupportedModelError",
    "supported_model_types",
    "family_for",
    "decoder_body",
    "decoder_layers",
    "patch",
    "unpatch",
    "is_patched",
    "patched_mlps",
    "gate_up",
    "weights",
    "text_config",
]


class UnsupportedModelError(ValueError):
    """The model has no gated MLP family we know how to patch."""


@dataclass(frozen=True)
class MLPFamily:
    """How one model family's MLP is found and computed."""

    name: str
    model_types: Tuple[str, ...]
    # config attributes holding the activation name, in order of preference
    activation_attrs: Tuple[str, ...] = ("hidden_act",)
    # Phi-3 style: one ``gate_up_proj`` whose output is [gate | up] along the last dim
    fused_gate_up: bool = False


FAMILIES: Dict[str, MLPFamily] = {}


def _register(family: MLPFamily) -> None:
    for t in family.model_types:
        FAMILIES[t] = family


_register(MLPFamily("llama", ("llama",)))
_register(MLPFamily("mistral", ("mistral",)))
_register(MLPFamily("qwen2", ("qwen2",)))
_register(MLPFamily("qwen3", ("qwen3",)))
_register(MLPFamily("gemma", ("gemma",), activation_attrs=("hidden_activation", "hidden_act")))
_register(MLPFamily("gemma2", ("gemma2",), activation_attrs=("hidden_activation", "hidden_act")))
_register(MLPFamily("gemma3", ("gemma3", "gemma3_text"), activation_attrs=("hidden_activation", "hidden_act")))
_register(MLPFamily("phi3", ("phi3",), fused_gate_up=True))

# transformers activation names -> our kernel activation names
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu": "gelu",
}


def supported_model_types() -> List[str]:
    return sorted(FAMILIES)


def text_config(model_or_config: Any) -> Any:
    """The language model's config (multimodal Gemma 3 nests it under ``text_config``)."""
    config = getattr(model_or_config, "config", model_or_config)
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def family_for(model: nn.Module) -> MLPFamily:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"lape_kernels cannot patch model_type {model_type!r}: supported families are "
            f"{', '.join(supported_model_types())} (gated FFN: gate_proj/up_proj/down_proj or Phi-3's gate_up_proj)"
        )
    return family


def _activation_for(family: MLPFamily, config: Any) -> str:
    for attr in family.activation_attrs:
        name = getattr(config, attr, None)
        if name:
            if name not in _ACTIVATIONS:
                raise UnsupportedModelError(
                    f"activation {name!r} (config.{attr}) is not supported; supported: {sorted(_ACTIVATIONS)}"
                )
            return _ACTIVATIONS[name]
    raise UnsupportedModelError(f"config has none of {family.activation_attrs}: cannot tell the MLP activation")


def decoder_layers(model: nn.Module) -> Tuple[nn.Module, nn.ModuleList]:
    """(decoder body, its ``layers`` ModuleList): the first ModuleList named ``layers`` whose
    blocks own a gated ``mlp`` (else the first whose blocks own any ``mlp``, so that
    ``_check_mlp`` names what is missing). The body is where the attention mask arrives.

    Gated first: multimodal models (Gemma 3) list a vision tower whose encoder ``layers`` have
    plain ``fc1``/``fc2`` MLPs before the language model."""
    candidates = []
    for name, module in model.named_modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0 and hasattr(layers[0], "mlp"):
            candidates.append((module, layers))
    for module, layers in candidates:
        mlp = layers[0].mlp
        if hasattr(mlp, "gate_proj") or hasattr(mlp, "gate_up_proj"):
            return module, layers
    if candidates:
        return candidates[0]
    raise UnsupportedModelError(
        f"{type(model).__name__} has no decoder layers with a gated MLP (looked for a `layers` ModuleList of blocks with `.mlp`)"
    )


def decoder_body(model: nn.Module) -> nn.Module:
    return decoder_layers(model)[0]


def _check_mlp(mlp: nn.Module, family: MLPFamily) -> None:
    names = ("gate_up_proj", "down_proj") if family.fused_gate_up else ("gate_proj", "up_proj", "down_proj")
    missing = [n for n in names if not isinstance(getattr(mlp, n, None), nn.Linear)]
    if missing:
        raise UnsupportedModelError(
            f"{type(mlp).__name__} is not a gated MLP of family {family.name!r}: missing nn.Linear {missing}"
        )


@dataclass
class PatchedMLPState:
    """Everything the patched forward of one MLP needs. Plain Python (never in state_dict)."""

    layer_index: int
    activation: str
    family: MLPFamily
    # set by ``record``: an object with ``token_lang(num_tokens, device) -> (Tensor|None, int)``
    # and ``accumulate(layer_index, over_zero, act_sum)``
    recorder: Any = None
    # set by ``deactivate``: int64 indices whose act(gate)*up is zeroed
    deactivated: Optional[torch.Tensor] = None
    # set by sparse training (lape_kernels.training.sparse_mlp)
    sparse: Any = None


def gate_up(mlp: nn.Module, x2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """gate and up projections of ``x2`` [T, H] through the (frozen) base weights."""
    st: PatchedMLPState = mlp._lape
    if st.family.fused_gate_up:
        gu = mlp.gate_up_proj(x2)
        return gu.chunk(2, dim=-1)
    return mlp.gate_proj(x2), mlp.up_proj(x2)


def weights(mlp: nn.Module) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Wg [I, H], Wu [I, H], Wd [H, I]) as views of the module's weights."""
    st: PatchedMLPState = mlp._lape
    if st.family.fused_gate_up:
        wg, wu = mlp.gate_up_proj.weight.chunk(2, dim=0)
        return wg, wu, mlp.down_proj.weight
    return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight


def biases(mlp: nn.Module) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    st: PatchedMLPState = mlp._lape
    if st.family.fused_gate_up:
        b = mlp.gate_up_proj.bias
        bg, bu = (None, None) if b is None else b.chunk(2, dim=0)
        return bg, bu, mlp.down_proj.bias
    return mlp.gate_proj.bias, mlp.up_proj.bias, mlp.down_proj.bias


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
    from . import ops  # imported lazily so that patching metadata works without the extension

    st: PatchedMLPState = self._lape
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if st.sparse is not None:
        from .training.sparse_mlp import sparse_mlp_forward

        out = sparse_mlp_forward(self, x2)
        return out.reshape(*shape[:-1], out.shape[-1])
    if st.recorder is not None:
        token_lang, num_langs = st.recorder.token_lang(x2.shape[0], x2.device)
        if getattr(st.recorder, "fused_gemm", False) and _fused_gemm_applies(self, x2):
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
    out = self.down_proj(h)
    return out.reshape(*shape[:-1], out.shape[-1])


def is_patched(model: nn.Module) -> bool:
    return bool(getattr(model, "_lape_patched", False))


def patched_mlps(model: nn.Module) -> List[nn.Module]:
    """The patched MLP modules in layer order (error if the model is not patched)."""
    if not is_patched(model):
        raise RuntimeError("model is not patched: call lape_kernels.patch(model) first")
    _, layers = decoder_layers(model)
    return [layer.mlp for layer in layers]


def patch(
    model: nn.Module,
    neurons: Any = None,
    language: Optional[str] = None,
    chunked_loss: bool = True,
    recompute: Optional[str] = None,
) -> nn.Module:
    """Route ``model``'s MLPs through lape_kernels ops (in place; returns ``model``).

    Idempotent: patching a patched model only applies what is new (e.g. ``neurons``).
    ``neurons`` (a per-layer list of index tensors, or a ``NeuronSet`` with ``language``) makes
    exactly those neurons' weights trainable (sparse neuron fine-tuning); everything else is frozen.
    ``chunked_loss`` makes ``model(..., labels=...)`` use the memory-lean chunked LM-head loss.
    ``recompute`` ("none", "up" or "gate_up"; sparse training only) makes the sparse MLPs
    recompute those projections in backward instead of keeping them: less activation memory, one
    or two more GEMMs per layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects a torch.nn.Module, got {type(model).__name__}")
    if recompute is not None:  # checked before any change to the model
        from .training.sparse_mlp import RECOMPUTE_MODES, has_trainable_neurons

        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
        if neurons is None and not has_trainable_neurons(model):
            raise ValueError("recompute applies to sparse neuron training: pass neurons= as well")
    family = family_for(model)
    config = text_config(model)
    activation = _activation_for(family, config)
    _, layers = decoder_layers(model)
    for layer in layers:
        _check_mlp(layer.mlp, family)
    for index, layer in enumerate(layers):
        mlp = layer.mlp
        if getattr(mlp, "_lape", None) is None:
            mlp._lape = PatchedMLPState(layer_index=index, activation=activation, family=family)
            mlp.forward = types.MethodType(_lape_mlp_forward, mlp)
    model._lape_patched = True
    if chunked_loss:
        from .training.loss import install_chunked_loss

        install_chunked_loss(model)
    if neurons is not None:
        from .training.sparse_mlp import set_trainable_neurons

        set_trainable_neurons(model, neurons, language=language, recompute=recompute or "none")
    elif recompute is not None:
        from .training.sparse_mlp import set_recompute

        set_recompute(model, recompute)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: original forwards, original weights, original ``requires_grad`` flags.

    Trained neuron values are discarded (use ``lape_kernels.merge`` to keep them).
    """
    if not is_patched(model):
        return model
    from .training.sparse_mlp import clear_trainable_neurons
    from .training.loss import uninstall_chunked_loss

    clear_trainable_neurons(model)
    uninstall_chunked_loss(model)
    _, layers = decoder_layers(model)
    for layer in layers:
        mlp = layer.mlp
        if "forward" in mlp.__dict__:
            del mlp.forward
        if "_lape" in mlp.__dict__:
            del mlp._lape
    del model._lape_patched
    return model
