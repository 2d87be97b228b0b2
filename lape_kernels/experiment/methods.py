"""The methods compared (``neurons``, ``random``, ``ffn``, ``full``, ``lora``): which neurons a
run trains, the settings hash that names its result, and making exactly the method's parameters
trainable on the patched model.

Why separate from the training loop: the benchmarks set a method up the same way
(``setup_method``), and the demo asks whether a run is finished (``settings_hash``) without
loading a model.
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .config import FinetuneConfig
from .errors import ExperimentError, one_line
from .inputs import model_intermediate_size
from .outputs import config_hash
from .safety import check_same_model

__all__ = ["neuron_selection", "settings_hash", "setup_method", "count_parameters"]


def _mlp_module_names(model: nn.Module) -> List[str]:
    from .. import introspection

    return list(introspection.family_for(model).linear_names)


def _load_neuron_set(path: str, language: str, languages: Optional[Sequence[str]] = None,
                     intermediate_size: Optional[int] = None):
    from ..neurons import NeuronSet

    try:
        ns = NeuronSet.load(path, languages=languages, intermediate_size=intermediate_size)
    except FileNotFoundError:
        raise ExperimentError(f"--neurons {path}: no such neuron set") from None
    except (ValueError, TypeError, OSError) as exc:
        raise ExperimentError(f"--neurons {path}: {one_line(exc)}") from None
    if language not in ns.languages:
        raise ExperimentError(f"--neurons {path} has no language {language!r} (it has {', '.join(ns.languages)})")
    return ns


def neuron_selection(cfg: FinetuneConfig) -> Tuple[Optional[Any], Optional[List[torch.Tensor]], Optional[Any]]:
    """(source NeuronSet, per-layer dense neurons to train, expert neurons to train or None) for
    neurons/random, else (None, None, None). A set with expert neurons (a mixture-of-experts
    model) trains both; its random baseline has the same total over all dense and expert units."""
    if cfg.method not in ("neurons", "random"):
        return None, None, None
    ns = _load_neuron_set(cfg.neurons, cfg.language, cfg.neuron_languages)
    if ns.intermediate_size is None:  # a LAPE reference file: the shape comes from the model
        inter = model_intermediate_size(cfg.model, cfg.cache_dir)
        if inter is not None:
            ns = _load_neuron_set(cfg.neurons, cfg.language, cfg.neuron_languages, inter)
    experts = None
    if cfg.method == "neurons":
        per_layer = ns.select(cfg.language)
        experts = ns.select_experts(cfg.language) if ns.has_experts else None
    else:
        try:
            if ns.has_experts:
                per_layer, experts = ns.random_experts_like(cfg.language, seed=cfg.seed, mode="total")
            else:
                per_layer = ns.random_like(cfg.language, seed=cfg.seed, mode="total")
        except ValueError as exc:
            raise ExperimentError(f"--neurons {cfg.neurons}: {one_line(exc)}") from None
    if sum(int(t.numel()) for t in per_layer + _flat(experts)) == 0:
        raise ExperimentError(f"--neurons {cfg.neurons}: language {cfg.language!r} has no neurons to train")
    return ns, per_layer, experts


def _flat(experts: Optional[Any]) -> List[torch.Tensor]:
    """Per-(MoE layer, expert) index tensors, layer-major ([] for none)."""
    return [t for row in experts for t in row] if experts is not None else []


def _per_layer_digest(per_layer: List[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in per_layer:
        h.update(str(t.numel()).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def settings_hash(cfg: FinetuneConfig) -> Tuple[Dict[str, Any], str, Tuple[Optional[Any], Optional[List[torch.Tensor]]]]:
    """(identity, hash, neuron selection): the hash names a result; a finished run with the same
    hash is reused, a checkpoint with the same hash is resumed. Cheap: loads no model."""
    cfg.check()
    selection = neuron_selection(cfg)
    identity = cfg.identity()
    # dense sets: the digest of old; expert neurons appended to it
    identity["neuron_set_digest"] = (_per_layer_digest(selection[1] + _flat(selection[2]))
                                     if selection[1] is not None else None)
    return identity, config_hash(identity), selection


def setup_method(model: nn.Module, cfg: FinetuneConfig, selection: Tuple[Any, ...] = (None, None, None)
                 ) -> Tuple[nn.Module, Dict[str, Any], Optional[Any]]:
    """Make the method's parameters trainable (everything else frozen).

    ``selection``: ``neuron_selection``'s (source set, dense neurons, expert neurons), or
    (source set, dense neurons) for a dense model.

    Returns (model to train, info, the NeuronSet trained for neurons/random else None).
    Every method runs on the patched model (fused MLP kernel, chunked LM loss), so timing and
    memory compare methods, not implementations.
    """
    from .. import api, patching
    from ..fingerprint import model_fingerprint, model_name
    from ..neurons import NeuronSet

    info: Dict[str, Any] = {}
    trained_ns = None
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.method in ("neurons", "random"):
        ns, per_layer, *rest = selection if selection[0] is not None else neuron_selection(cfg)
        experts = rest[0] if rest else None
        # identified on this model? (by fingerprint; --allow-other-model: a deliberate transfer)
        note = check_same_model(ns.model_fingerprint, ns.model_id, model, f"--neurons {cfg.neurons}",
                                allow_other_model=cfg.allow_other_model)
        try:
            ns.validate(model, allow_other_model=True)  # the shape (the model was checked above)
        except (ValueError, TypeError) as exc:
            raise ExperimentError(f"--neurons {cfg.neurons} does not fit the model: {one_line(exc)}") from None
        total = sum(int(t.numel()) for t in per_layer + _flat(experts))
        moe = {} if experts is None else {"experts": {cfg.language: experts}, "expert_layout": ns.expert_layout}
        trained_ns = NeuronSet({cfg.language: per_layer}, ns.num_layers, ns.intermediate_size, **moe,
                               model_id=model_name(model) or ns.model_id, hidden_size=ns.hidden_size,
                               notes=[f"{cfg.method} set for {cfg.language} (seed {cfg.seed})"
                                      if cfg.method == "random" else f"LAPE neurons of {cfg.language}"]
                               + ([note] if note else []),
                               model_fingerprint=model_fingerprint(model))
        try:
            if experts is None:
                api.patch(model, neurons=per_layer, recompute=cfg.recompute)
            else:  # a mixture-of-experts model: its dense (shared-expert) MLPs and its experts
                api.patch(model, neurons=per_layer if ns.num_layers else None, expert_neurons=experts,
                          recompute=cfg.recompute)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ExperimentError(f"--neurons {cfg.neurons} does not fit the model: {one_line(exc)}") from None
        info["neuron_count"] = total
        info["neurons_per_layer"] = [int(t.numel()) for t in per_layer]
        info["neuron_set_digest"] = _per_layer_digest(per_layer + _flat(experts))
        info["source_neuron_set_digest"] = _per_layer_digest(
            ns[cfg.language] + (_flat(ns.select_experts(cfg.language)) if experts is not None else []))
        if experts is not None:
            info["expert_neurons_per_layer"] = [sum(int(t.numel()) for t in row) for row in experts]
    elif cfg.method == "ffn":
        api.patch(model)
        for mlp in patching.patched_mlps(model):
            for p in mlp.parameters():
                p.requires_grad_(True)
    elif cfg.method == "full":
        api.patch(model)
        for p in model.parameters():
            p.requires_grad_(True)
    elif cfg.method == "lora":
        api.patch(model)
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:  # pragma: no cover - peft is a requirement
            raise ExperimentError(f"--method lora needs peft: {exc}") from None
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=_mlp_module_names(model), bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
    return model, info, trained_ns


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) over unique parameters (tied weights once)."""
    seen = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
