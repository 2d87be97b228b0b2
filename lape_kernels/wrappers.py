"""The wrappers users put around a Hugging Face model, seen through.

A patched model lives inside other people's tools: PEFT (``PeftModel`` and its task classes,
whose tuner holds the HF model), DDP / DataParallel / FSDP1 (``.module``), ``torch.compile``
(``OptimizedModule._orig_mod``) and accelerate's ``prepare`` (one of those, or the model itself).
Every public entry point acts on :func:`unwrap`'s result, the HF model inside, so a wrapper is
never mistaken for a model (``cannot patch model_type None``) nor its forward for the HF one.

Adapter layers are the other direction: PEFT replaces a ``Linear`` *inside* the model by a layer
that adds its own contribution (LoRA, IA3, ...). :func:`mlp_adapters` finds them in an MLP, so
that every path that reads an MLP's weights directly can refuse instead of silently computing
the model without the adapter.

Optional packages (peft, torch.distributed.fsdp, torch._dynamo) are looked up in
``sys.modules`` only: a model cannot be wrapped by a package that was never imported.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator, List, Optional, Tuple

from torch import nn

__all__ = [
    "unwrap",
    "wrapper_names",
    "parameter_wrapper",
    "unsharded",
    "adapter_base",
    "mlp_adapters",
    "describe_adapters",
    "trainable_adapter_parameters",
]


def _cls(module_name: str, class_name: str):
    mod = sys.modules.get(module_name)
    return getattr(mod, class_name, None) if mod is not None else None


def _inner(model: nn.Module) -> Optional[nn.Module]:
    """The module one wrapper layer holds, or None when ``model`` is not a known wrapper."""
    compiled = _cls("torch._dynamo.eval_frame", "OptimizedModule")
    if compiled is not None and isinstance(model, compiled):
        return model._orig_mod
    parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    fsdp1 = _cls("torch.distributed.fsdp.fully_sharded_data_parallel", "FullyShardedDataParallel")
    if isinstance(model, parallel) or (fsdp1 is not None and isinstance(model, fsdp1)):
        return model.module
    for module_name, class_name, attr in (
        ("peft.peft_model", "PeftModel", "base_model"),  # every task class (PeftModelForCausalLM, ...)
        ("peft.mixed_model", "PeftMixedModel", "base_model"),
        ("peft.tuners.tuners_utils", "BaseTuner", "model"),  # LoraModel, IA3Model, ...
    ):
        cls = _cls(module_name, class_name)
        if cls is not None and isinstance(model, cls):
            inner = getattr(model, attr)
            return inner if isinstance(inner, nn.Module) else None
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside ``model`` (``model`` itself when it wraps nothing).

    Sees through, in any nesting: ``torch.compile``'s OptimizedModule, DDP, DataParallel,
    FSDP1, PEFT's PeftModel (all task classes, prompt learning included), PeftMixedModel and
    their tuners (LoraModel, ...). FSDP2's ``fully_shard`` and accelerate's ``prepare`` on one
    process change the model in place and return it: nothing to see through."""
    seen = 0
    while True:
        inner = _inner(model)
        if inner is None or inner is model:
            return model
        model = inner
        seen += 1
        if seen > 16:  # a wrapper cycle would be a bug elsewhere: fail loudly, not forever
            raise RuntimeError(f"more than 16 nested wrappers around {type(model).__name__}")


def wrapper_names(model: nn.Module) -> List[str]:
    """The class names of the wrappers around the HF model, outermost first (for messages)."""
    names = []
    inner = _inner(model)
    while inner is not None and len(names) < 16:
        names.append(type(model).__name__)
        model, inner = inner, _inner(inner)
    return names


def parameter_wrapper(model: nn.Module) -> Optional[str]:
    """The name of a wrapper around or inside ``model`` that took note of its parameters when it
    was built (DDP's gradient reducer, FSDP's sharding), or None.

    Parameters added after such a wrapper exists (the trainable neuron slices) are neither
    synchronised nor sharded: their training would silently differ between processes."""
    fsdp2 = _cls("torch.distributed.fsdp._fully_shard._fully_shard", "FSDPModule")
    fsdp1 = _cls("torch.distributed.fsdp.fully_sharded_data_parallel", "FullyShardedDataParallel")
    cur: Optional[nn.Module] = model
    while cur is not None:
        if isinstance(cur, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            return type(cur).__name__
        if fsdp1 is not None and isinstance(cur, fsdp1):
            return "FullyShardedDataParallel"
        cur = _inner(cur)
    if fsdp2 is not None and any(isinstance(m, fsdp2) for m in unwrap(model).modules()):
        return "fully_shard (FSDP2)"
    return None


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[nn.Module]:
    """FSDP2 (``fully_shard``) modules of ``model`` with their full parameters for the block.

    Outside their forward, FSDP2 modules hold sharded ``DTensor`` parameters, which a plain
    tensor cannot be multiplied with (patching runs each MLP once to prove what it computes).
    A collective across the process group, like FSDP2's own forward: every rank must enter."""
    fsdp2 = _cls("torch.distributed.fsdp._fully_shard._fully_shard", "FSDPModule")
    sharded = [m for m in unwrap(model).modules() if isinstance(m, fsdp2)] if fsdp2 is not None else []
    for m in sharded:
        m.unshard()
    try:
        yield model
    finally:
        for m in reversed(sharded):
            m.reshard()


# ----------------------------------------------------------------------------- adapter layers


def adapter_base(module: nn.Module) -> Optional[nn.Module]:
    """The layer an adapter layer wraps (PEFT's ``BaseTunerLayer``: LoRA, IA3, DoRA, ...:
    ``base_layer`` + its own trainable contribution), or None for an ordinary module."""
    if not hasattr(module, "base_layer"):
        return None
    get_base = getattr(module, "get_base_layer", None)
    base = get_base() if callable(get_base) else module.base_layer
    return base if isinstance(base, nn.Module) else None


def mlp_adapters(mlp: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(child name, module)`` of each of ``mlp``'s projections that is an adapter layer."""
    return [(name, child) for name, child in mlp.named_children() if adapter_base(child) is not None]


def describe_adapters(model: nn.Module, mlps: List[nn.Module]) -> Optional[str]:
    """``"model.layers.0.mlp.gate_proj (lora.Linear), ..."`` for the adapter layers on ``mlps``
    (modules of ``model``), or None when they have none. Names are ``model``'s module paths."""
    names = {id(m): n for n, m in unwrap(model).named_modules()}
    found = []
    for mlp in mlps:
        prefix = names.get(id(mlp), type(mlp).__name__)
        prefix = f"{prefix}." if prefix else ""
        for child_name, child in mlp_adapters(mlp):
            parts = type(child).__module__.split(".")  # peft.tuners.lora.layer -> lora.Linear
            label = f"{parts[2]}.{type(child).__name__}" if parts[:2] == ["peft", "tuners"] else type(child).__name__
            found.append(f"{prefix}{child_name} ({label})")
    if not found:
        return None
    more = f", ... ({len(found)} in all)" if len(found) > 3 else ""
    return ", ".join(found[:3]) + more


def trainable_adapter_parameters(model: nn.Module) -> List[str]:
    """Names of the parameters that adapter layers add (not their base layer's) and that
    require grad: what a PEFT model trains."""
    out = []
    for prefix, module in unwrap(model).named_modules():
        base = adapter_base(module)
        if base is None:
            continue
        base_ids = {id(p) for p in base.parameters()}
        for name, p in module.named_parameters():
            full = f"{prefix}.{name}" if prefix else name
            if p.requires_grad and id(p) not in base_ids and full not in out:
                out.append(full)
    return out
