"""Model fingerprints: which model a statistics file, a neuron set or saved neurons were made from.

Why: a neuron index means something only for the weights it was found in, and two models of one
shape (a base model and its instruct variant, two checkpoints of a run) accept each other's
indices without any error. A path cannot tell models apart (a directory moves; one name can hold
several models over time), so the fingerprint is computed from the model itself:

- the text config's architecture fields (:data:`ARCHITECTURE_FIELDS`, those the config has);
- for the input embedding and every parameter of every decoder layer: its name (relative to the
  layer, so a CausalLM, its bare decoder and a multimodal wrapper agree), its shape, and the
  values at :data:`SAMPLES_PER_TENSOR` fixed positions (a Weyl sequence computed with integers,
  so the positions are the same on every platform and torch version), each rounded to bfloat16
  (round to nearest even).

Cost: a few thousand scalar reads whatever the model's size (about 20k values for an 8B model),
so it is computed whenever statistics are recorded or neurons are saved or checked.

What it decides: a model whose weights differ in a sampled position (any fine-tuning, a
different checkpoint, another model of the same shape) gets another fingerprint; moving or
renaming the model directory, loading it on another device, wrapping it in DDP or
``torch.compile``, or the bf16 copy of an fp32 model (whose values are exactly the fp32 values
rounded to bf16) keep it. An fp16 copy or a quantised
model usually gets another one (fp16's rounding is not bf16's): such a use needs the explicit
``allow_other_model=True``. A change confined to elements outside the sample is not seen: this
is a guard against mixing up models, not an integrity hash. Parameters the library adds (names
starting with ``lape_``: sparse training's trainable slices) are not part of the model, so a
model being sparse-trained keeps its base model's fingerprint until ``merge``.

Unknown: models whose weights are not readable here (``meta`` tensors, sharded ``DTensor``s)
get ``None``; so do files written before fingerprints existed. Checks accept an unknown
fingerprint and say so in the object's notes.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .introspection import decoder_layers, model_type, text_config

__all__ = [
    "ARCHITECTURE_FIELDS",
    "SAMPLES_PER_TENSOR",
    "FINGERPRINT_VERSION",
    "ModelMismatchError",
    "model_fingerprint",
    "model_name",
    "describe_model",
    "check_model",
    "check_one_model",
    "unknown_note",
    "recorded_model",
]

FINGERPRINT_VERSION = 1
#: text-config fields hashed (those present): what kind of network the weights belong to
ARCHITECTURE_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "hidden_activation",
)
#: values sampled per tensor (all of them for smaller tensors)
SAMPLES_PER_TENSOR = 64
_WEYL = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: consecutive multiples spread evenly mod 2^64
_ADDED_PREFIX = "lape_"


class ModelMismatchError(ValueError):
    """Statistics, a neuron set or saved neurons applied to (or combined with) another model."""


def _positions(numel: int) -> List[int]:
    if numel <= SAMPLES_PER_TENSOR:
        return list(range(numel))
    return [(((j + 1) * _WEYL) % (1 << 64)) * numel >> 64 for j in range(SAMPLES_PER_TENSOR)]


def _tensors(model: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """(stable name, tensor) of the embedding and of each decoder layer's own parameters."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if embeddings is not None and isinstance(getattr(embeddings, "weight", None), torch.Tensor):
        yield "embed_tokens.weight", embeddings.weight
    for index, layer in enumerate(decoder_layers(model)[1]):
        for name, p in sorted(layer.named_parameters()):
            if not name.rsplit(".", 1)[-1].startswith(_ADDED_PREFIX):
                yield f"layers.{index}.{name}", p


def _sample(t: torch.Tensor) -> Optional[torch.Tensor]:
    """The values of ``t`` at the sample positions (1-D, on ``t``'s device), None if unreadable."""
    if t.is_meta:
        return None
    try:
        flat = t.detach().reshape(-1)
        return flat[torch.tensor(_positions(flat.numel()), dtype=torch.int64, device=flat.device)]
    except (NotImplementedError, RuntimeError, TypeError):
        if type(t) in (torch.Tensor, nn.Parameter):
            raise  # a plain tensor must be readable: a bug, not an unknown fingerprint
        return None  # a tensor subclass (sharded DTensor, quantised weights) that cannot be indexed here


def _unwrapped(model: nn.Module) -> nn.Module:
    """The HF model inside DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers: the
    wrapper has no config or embeddings of its own, and must not change the fingerprint."""
    while not hasattr(model, "config"):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _is_sharded(t: torch.Tensor) -> bool:
    """A DTensor holds one shard per process: indexing it would start a collective."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> Optional[str]:
    """``"v1:<32 hex digits>"`` identifying ``model``'s weights (see the module docstring for what
    it covers), or ``None`` when the weights cannot be read here (meta or sharded tensors)."""
    model = _unwrapped(model)
    config = text_config(model)
    arch = {f: getattr(config, f) for f in ARCHITECTURE_FIELDS if getattr(config, f, None) is not None}
    h = hashlib.sha256()
    h.update(json.dumps(arch, sort_keys=True, default=str).encode())
    names, samples = [], []
    for name, t in _tensors(model):
        picked = None if _is_sharded(t) else _sample(t)
        if picked is None:
            return None
        picked = picked.to(torch.float32).to(torch.bfloat16) if picked.is_floating_point() else picked.to(torch.int64)
        names.append(f"{name}:{list(t.shape)}:{'f' if t.is_floating_point() else 'i'}")
        samples.append(picked.reshape(-1).view(torch.int16 if picked.dtype == torch.bfloat16 else torch.int64))
    h.update("\n".join(names).encode())
    for s in samples:  # the bits, as little-endian bytes on every platform
        h.update(s.cpu().numpy().astype("<i2" if s.dtype == torch.int16 else "<i8").tobytes())
    return f"v{FINGERPRINT_VERSION}:{h.hexdigest()[:32]}"


def model_name(model: nn.Module) -> Optional[str]:
    """The name or path ``model`` was loaded from (``config._name_or_path``), None if unnamed."""
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None


def describe_model(name: Optional[str], fingerprint: Optional[str], kind: Optional[str] = None) -> str:
    """A model for messages: its name and its fingerprint."""
    who = repr(name) if name else f"an unnamed {kind + ' ' if kind else ''}model"
    return f"{who} (fingerprint {fingerprint or 'unknown'})"


OLD_FILE = "written before lape_kernels recorded one, or made without a model"


def unknown_note(what: str, reason: str = OLD_FILE) -> str:
    """Why a check of ``what`` accepted it without knowing its model."""
    return (f"no model fingerprint recorded for {what} ({reason}): the model it was made from is unknown, "
            "so model checks accept it")


def check_model(recorded: Optional[str], recorded_name: Optional[str], model: nn.Module, what: str, *,
                allow_other_model: bool = False, way_out: str = "pass allow_other_model=True") -> Optional[str]:
    """Raise :class:`ModelMismatchError` unless ``model`` is the model ``what`` was made from
    (fingerprint ``recorded``, name ``recorded_name``). Returns a note when nothing could be
    checked (no recorded fingerprint, or ``model``'s is unknown) or the check was waived by
    ``allow_other_model`` (a deliberate transfer), else None."""
    if recorded is None:
        return unknown_note(what)
    current = model_fingerprint(model)
    if current is None:
        return (f"{what} was made for {describe_model(recorded_name, recorded)}; this model's weights cannot be "
                "read here (meta or sharded tensors), so that was not checked")
    if current == recorded:
        return None
    mine = describe_model(model_name(model), current, model_type(model))
    theirs = describe_model(recorded_name, recorded)
    if allow_other_model:
        return f"{what} was made for {theirs} and applied to {mine} on purpose (allow_other_model=True)"
    raise ModelMismatchError(
        f"{what} was made for {theirs}, not for this model, {mine}: neuron indices and statistics belong to "
        f"one model's weights; for a deliberate transfer (e.g. base-model neurons on its instruct variant) "
        f"{way_out}"
    )


def check_one_model(sources: Mapping[str, Tuple[Optional[str], Optional[str]]], action: str
                    ) -> Tuple[Optional[str], Optional[str], List[str]]:
    """The rule for combining things made from models (shards of statistics, languages for
    ``identify``): every known fingerprint is the same. ``sources``: label (as printed) ->
    (fingerprint, model name). Returns (the fingerprint, the first model name recorded with it, notes about
    sources without a fingerprint); raises :class:`ModelMismatchError` naming two sources and
    their models when fingerprints differ."""
    first: Optional[Tuple[str, Optional[str], Optional[str]]] = None
    unknown = []
    for label, (fingerprint, name) in sources.items():
        if fingerprint is None:
            unknown.append(label)
            continue
        if first is None:
            first = (label, fingerprint, name)
        elif fingerprint != first[1]:
            raise ModelMismatchError(
                f"cannot {action} statistics of different models: {first[0]} comes from "
                f"{describe_model(first[2], first[1])}, {label} from {describe_model(name, fingerprint)}"
            )
    notes = [unknown_note(", ".join(unknown))] if unknown else []
    if first is None:
        return None, None, notes
    names = [n for fp, n in sources.values() if fp == first[1] and n]
    return first[1], (names[0] if names else None), notes


def recorded_model(meta: Any) -> Tuple[Optional[str], Optional[str]]:
    """(fingerprint, model name) recorded in a metadata dict (``model_fingerprint``, then
    ``model_id`` or ``model``)."""
    if not isinstance(meta, Mapping):
        return None, None
    name = meta.get("model_id") or meta.get("model")
    return meta.get("model_fingerprint"), (str(name) if name else None)
