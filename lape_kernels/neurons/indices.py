"""Neuron indices: ``check_layer_indices`` (the one rule for a layer's indices) and the expert
neurons of a mixture-of-experts model (the layout they index and the one rule for them).

A language's expert neurons are a list over the model's MoE layers (``ExpertLayout.layers``,
the decoder-layer indices, aligned with ``ActivationStats.experts.layers``) of lists over
experts of sorted int64 index tensors into the expert's intermediate dimension
(``PerExpert``): ``neurons[m][e]`` are neuron indices of expert ``e`` of MoE layer ``m``.
This is what ``NeuronSet.select_experts(lang)`` returns and what ``deactivate(...,
expert_neurons=...)`` and ``patch(model, expert_neurons=...)`` take.
"""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

__all__ = ["check_layer_indices", "ExpertLayout", "PerExpert", "check_expert_indices", "layout_of", "expert_tensors",
           "read_expert_tensors", "random_units"]

PerExpert = List[List[torch.Tensor]]


def check_layer_indices(values: Any, where: str, intermediate_size: Optional[int] = None, *,
                        int64_tensor: bool = False) -> Tuple[torch.Tensor, bool]:
    """The one rule for a layer's neuron indices, wherever they enter the library (``NeuronSet``,
    ``patch(neurons=...)``, ``deactivate``, ``load_neurons``): integers, 1-D, each in
    ``[0, intermediate_size)`` (when known), no duplicates. ``int64_tensor``: only an int64
    tensor is accepted (what ``patch`` documents), not a list or another integer dtype.

    Returns (the indices sorted ascending, as a new CPU int64 tensor; whether the input was
    sorted already). Errors start with ``where`` and name the offending value.
    """
    if isinstance(values, torch.Tensor):
        t = values
    elif int64_tensor:
        raise TypeError(f"{where}: expected a torch.Tensor of int64 indices, got {type(values).__name__}")
    elif isinstance(values, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise TypeError(f"{where}: indices must be integers, got a {type(values).__name__} "
                            f"containing {sorted({type(v).__name__ for v in values})}")
        t = torch.tensor(list(values), dtype=torch.int64)
    else:
        raise TypeError(f"{where}: expected a 1-D integer tensor (or list of ints), got {type(values).__name__}")
    if int64_tensor and t.dtype != torch.int64:
        raise TypeError(f"{where}: indices must be int64 (torch.long), got {t.dtype}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{where}: indices must have an integer dtype (int64 preferred), got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{where}: indices must be 1-D, got shape {tuple(t.shape)}")
    t = t.detach().to(device="cpu", dtype=torch.int64, copy=True).contiguous()
    if t.numel() == 0:
        return t, True
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or (intermediate_size is not None and hi >= intermediate_size):
        bad = lo if lo < 0 else hi
        raise ValueError(f"{where}: index {bad} out of range "
                         f"[0, {intermediate_size if intermediate_size is not None else 'inf'})")
    was_sorted = t.numel() < 2 or bool((t[1:] > t[:-1]).all())
    if not was_sorted:
        t = torch.sort(t).values
        dup = t[1:][t[1:] == t[:-1]]
        if dup.numel():
            raise ValueError(f"{where}: duplicate index {int(dup[0])}")
    return t, was_sorted


class ExpertLayout(NamedTuple):
    """What expert neuron indices refer to: the decoder-layer indices of the MoE layers, the
    experts per layer, and each expert's intermediate size."""

    layers: Tuple[int, ...]
    num_experts: int
    intermediate_size: int

    def to_json(self) -> Dict[str, Any]:
        return {"layers": list(self.layers), "num_experts": self.num_experts, "intermediate_size": self.intermediate_size}


def layout_of(value: Any, where: str = "expert_layout") -> ExpertLayout:
    """An ``ExpertLayout`` from one, from a ``(layers, num_experts, intermediate_size)`` tuple, from a
    JSON dict with those keys, or from ``introspection.ExpertShape``; checked."""
    if isinstance(value, dict):
        missing = [k for k in ("layers", "num_experts", "intermediate_size") if k not in value]
        if missing:
            raise ValueError(f"{where}: missing {missing}")
        layers, experts, inter = value["layers"], value["num_experts"], value["intermediate_size"]
    elif hasattr(value, "layers") and hasattr(value, "num_experts") and hasattr(value, "intermediate_size"):
        layers, experts, inter = value.layers, value.num_experts, value.intermediate_size
    elif isinstance(value, (tuple, list)) and len(value) == 3:
        layers, experts, inter = value
    else:
        raise TypeError(f"{where} must be an ExpertLayout or (layers, num_experts, intermediate_size), "
                        f"got {type(value).__name__}")
    if isinstance(layers, (str, torch.Tensor)) or not isinstance(layers, Sequence) or not layers or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in layers) or \
            list(layers) != sorted(set(layers)):
        raise ValueError(f"{where}: layers must be a non-empty sorted list of unique decoder-layer indices, got {layers!r}")
    for name, v in (("num_experts", experts), ("intermediate_size", inter)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{where}: {name} must be a positive int, got {v!r}")
    return ExpertLayout(tuple(layers), experts, inter)


def check_expert_indices(values: Any, where: str, layout: ExpertLayout, *,
                         int64_tensor: bool = False) -> Tuple[PerExpert, List[Tuple[int, int]]]:
    """The one rule for a language's expert neurons: a list with one entry per MoE layer, each a
    list with one index tensor per expert, each checked by ``check_layer_indices`` against the
    expert's intermediate size. Returns (sorted CPU int64 copies, the (moe layer, expert) pairs
    whose input was not sorted)."""
    def seq(x: Any, what: str, n: int) -> Sequence[Any]:
        if isinstance(x, (torch.Tensor, str)) or not isinstance(x, Sequence):
            raise TypeError(f"{what} must be a list with {n} entries, got {type(x).__name__}")
        if len(x) != n:
            raise ValueError(f"{what} has {len(x)} entries, expected {n}")
        return x

    out: PerExpert = []
    unsorted: List[Tuple[int, int]] = []
    for m, per_layer in enumerate(seq(values, f"{where} (one entry per MoE layer {list(layout.layers)})",
                                      len(layout.layers))):
        row = []
        for e, idx in enumerate(seq(per_layer, f"{where}[moe layer {m}] (one entry per expert)", layout.num_experts)):
            t, was_sorted = check_layer_indices(idx, f"{where}[moe layer {m} = decoder layer {layout.layers[m]}]"
                                                     f"[expert {e}]", layout.intermediate_size,
                                                int64_tensor=int64_tensor)
            if not was_sorted:
                unsorted.append((m, e))
            row.append(t)
        out.append(row)
    return out, unsorted


def expert_tensors(k: int, neurons: PerExpert) -> Dict[str, torch.Tensor]:
    """Language ``k``'s expert neurons as two flat tensors: ``experts.indices.{k}`` and
    ``experts.offsets.{k}`` (int64 ``[M*E + 1]``, layer-major, expert-minor)."""
    flat = [t for row in neurons for t in row]
    counts = torch.tensor([0] + [t.numel() for t in flat], dtype=torch.int64)
    return {f"experts.indices.{k}": torch.cat(flat).contiguous(), f"experts.offsets.{k}": torch.cumsum(counts, 0)}


def read_offset_table(get: Any, keys: set, ik: str, ok: str, rows: int, rows_text: str, lang: str, where: str,
                      error: type = ValueError) -> List[torch.Tensor]:
    """``rows`` index tensors stored flat as ``ik`` (1-D) with the offset table ``ok`` (int64
    ``[rows + 1]``), the format of neuron-set files for dense and expert neurons alike; a missing
    or malformed table is an ``error`` naming ``where`` and the cause."""
    if ik not in keys or ok not in keys:
        raise error(f"{where}: missing {ik!r}/{ok!r} for language {lang!r}")
    indices, offsets = get(ik), get(ok)
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.numel() != rows + 1:
        raise error(f"{where}: {ok} must be int64 [{rows_text} + 1 = {rows + 1}], "
                    f"got {offsets.dtype} {tuple(offsets.shape)}")
    if indices.dim() != 1:
        raise error(f"{where}: {ik} must be 1-D, got {tuple(indices.shape)}")
    counts = offsets[1:] - offsets[:-1]
    if int(offsets[0]) != 0 or int(offsets[-1]) != indices.numel() or bool((counts < 0).any()):
        raise error(f"{where}: {ok} is not a valid offset table for {indices.numel()} indices")
    return [t.clone() for t in torch.split(indices, counts.tolist())]


def read_expert_tensors(get: Any, keys: set, k: int, lang: str, layout: ExpertLayout, where: str,
                        error: type = ValueError) -> PerExpert:
    """The inverse of ``expert_tensors`` (``get(name)`` reads a tensor); a malformed table is an
    ``error`` naming ``where``."""
    M, E = len(layout.layers), layout.num_experts
    flat = read_offset_table(get, keys, f"experts.indices.{k}", f"experts.offsets.{k}", M * E,
                             "moe layers * experts", lang, where, error)
    return [flat[m * E:(m + 1) * E] for m in range(M)]


def random_units(dense_counts: Sequence[int], intermediate: int, expert_counts: torch.Tensor, layout: ExpertLayout,
                 seed: int, mode: str) -> Tuple[List[torch.Tensor], PerExpert]:
    """A random baseline of dense + expert neurons (sorted int64), from one CPU generator.
    ``per_layer``: the same count in each dense layer and in each (MoE layer, expert), drawn
    uniformly without replacement there. ``total``: the same total, drawn uniformly without
    replacement over all units (dense layers first, then MoE layer x expert x neuron)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    M, E, I_e = len(layout.layers), layout.num_experts, layout.intermediate_size
    if mode == "per_layer":
        dense = [torch.sort(torch.randperm(intermediate, generator=gen)[:c]).values for c in dense_counts]
        experts = [[torch.sort(torch.randperm(I_e, generator=gen)[:int(expert_counts[m, e])]).values for e in range(E)]
                   for m in range(M)]
        return dense, experts
    if mode != "total":
        raise ValueError(f"mode must be 'per_layer' or 'total', got {mode!r}")
    L = len(dense_counts)
    n_dense = L * intermediate
    flat = torch.sort(torch.randperm(n_dense + M * E * I_e, generator=gen)[: sum(dense_counts) + int(expert_counts.sum())]).values
    d, x = flat[flat < n_dense], flat[flat >= n_dense] - n_dense
    dense = [d[d // intermediate == li] % intermediate for li in range(L)] if intermediate else []
    unit = x // I_e  # m * E + e
    experts = [[x[unit == m * E + e] % I_e for e in range(E)] for m in range(M)]
    return dense, experts
