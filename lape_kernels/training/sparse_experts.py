"""Sparse training of expert neurons: the selected rows of each routed expert's gate/up and columns
of its down train as small parameters; the stacked expert weights stay frozen and untouched.

transformers stores a MoE layer's experts as ``gate_up_proj [E, 2I, H]`` (gate rows, then up
rows) and ``down_proj [E, H, I]``. Per experts module we register, like the dense MLP
(``sparse_mlp``), ``lape_gate_rows [K, H]``, ``lape_up_rows [K, H]``, ``lape_down_cols [H, K]``
and the index buffer ``lape_neuron_index [K]``: the K selected (expert, neuron) pairs of the
layer, expert-major, as flat indices ``expert * I + neuron`` (sorted), so a layer's selection is
one set of parameters however many experts it spans (one optimizer entry, one norm).

The experts call keeps the routing of the experts implementation the model selected (eager,
grouped_mm, batched_mm: ``experts_forward.run_experts``); only each expert's
``down_e(act(gate_e x) * up_e x)`` on its rows is ours: one ``autograd.Function`` per MoE layer
that runs, per expert, the dense sparse MLP's forward and backward (``_sparse_math``: the same
split ops and rounding points) on the expert's weight views and its share of the slices, and
writes each expert's slice gradients into the layer's parameter gradients. No tensor of an
expert weight's shape is formed (no dense gradient, no clone, no mask).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import patching
from ..experts_forward import run_experts
from ..introspection import expert_shape
from ..neurons.indices import ExpertLayout, check_expert_indices
from ._autograd import per_device_function
from ._sparse_math import (INDEX_NAME, PARAM_NAMES, SLOTS_NAME, _ops, _sparse_mlp_backward, _sparse_mlp_forward,
                           warn_frozen_slices)

__all__ = ["SparseExpertsState", "select_expert_neurons", "is_expert_neuron_set", "install_expert_slices",
           "clear_expert_slices", "expert_selection", "split_flat_index", "LOCAL_NAME"]

#: per selected pair, its neuron index inside its expert (``lape_neuron_index % I``; not saved)
LOCAL_NAME = "lape_neuron_local"


# ----------------------------------------------------------------------------- selection


def is_expert_neuron_set(neurons: Any) -> bool:
    """Whether ``neurons`` is a NeuronSet holding expert neurons."""
    return bool(getattr(neurons, "has_experts", False)) and callable(getattr(neurons, "select_experts", None))


def select_expert_neurons(model: nn.Module, expert_neurons: Any,
                          language: Optional[str] = None) -> List[List[torch.Tensor]]:
    """Per MoE layer, per expert, the sorted int64 CPU indices ``expert_neurons`` selects (a list
    over MoE layers of lists over experts of int64 index tensors, or a NeuronSet with expert
    neurons and ``language``), checked against the model's stacked expert weights by the one
    rule for expert indices (``neurons.indices.check_expert_indices``; unsorted indices are
    sorted, as ``patch(neurons=...)`` sorts). Nothing is changed."""
    shape = expert_shape(model)
    if shape is None:
        raise ValueError("expert_neurons: the model has no mixture-of-experts layers (use neurons= for its MLPs)")
    if is_expert_neuron_set(expert_neurons):
        langs = list(expert_neurons.languages)
        if language is None:
            raise ValueError(f"expert_neurons is a NeuronSet: pass language= (one of {langs})")
        if language not in langs:
            raise KeyError(f"language {language!r} not in the NeuronSet (languages: {langs})")
        expert_neurons.validate(model)
        expert_neurons = expert_neurons.select_experts(language)
    elif isinstance(expert_neurons, torch.Tensor) or not isinstance(expert_neurons, (list, tuple)):
        raise TypeError("expert_neurons must be a list over MoE layers of lists over experts of int64 index tensors, "
                        f"or a NeuronSet with expert neurons and language=..., got {type(expert_neurons).__name__}")
    layout = ExpertLayout(tuple(shape.layers), shape.num_experts, shape.intermediate_size)
    return check_expert_indices(expert_neurons, "expert_neurons", layout, int64_tensor=True)[0]


def expert_selection(indices: Sequence[Sequence[torch.Tensor]]) -> int:
    """How many (layer, expert, neuron) units a selection holds."""
    return sum(int(t.numel()) for layer in indices for t in layer)


# ----------------------------------------------------------------------------- autograd


class _ExpertCtx:
    """The ctx one expert's share of the layer's Function hands to the dense sparse MLP's forward
    and backward (``_sparse_math``): what they save, and which gradients are wanted."""

    def __init__(self, needs_input_grad: Tuple[bool, ...], saved: tuple = ()) -> None:
        self.needs_input_grad = needs_input_grad
        self.saved_tensors = saved

    def save_for_backward(self, *tensors) -> None:
        self.saved_tensors = tensors


@dataclass(frozen=True)
class _Group:
    """One expert's rows ``[r0, r1)`` of the (expert-sorted) input and slots ``[s0, s1)`` of the slices."""

    expert: int
    r0: int
    r1: int
    s0: int
    s1: int


def _groups(st: "SparseExpertsState", rows_per_expert: Sequence[int]) -> List[_Group]:
    out, r = [], 0
    for e, n in enumerate(rows_per_expert):
        if n:
            out.append(_Group(e, r, r + n, st.starts[e], st.starts[e + 1]))
            r += n
    return out


def _experts_forward(ctx, x, gate_up, down, pg, pu, pd, local, slots, groups, activation, recompute):
    """y [S, H] for rows ``x`` [S, H] sorted by expert (``groups``): per expert, the dense sparse
    MLP forward on views of its weights and of its share of the slices."""
    inter = down.shape[-1]
    # the dense function's argument positions: x 0, pg 7, pu 8, pd 9
    needs = (ctx.needs_input_grad[0],) + (False,) * 6 + tuple(ctx.needs_input_grad[3:6]) + (False,) * 5
    outs, saved, sizes = [], [], []
    for g in groups:
        sub = _ExpertCtx(needs)
        wgu = gate_up[g.expert]
        outs.append(_sparse_mlp_forward(sub, x[g.r0:g.r1], wgu[:inter], wgu[inter:], down[g.expert], None, None, None,
                                        pg[g.s0:g.s1], pu[g.s0:g.s1], pd[:, g.s0:g.s1], local[g.s0:g.s1],
                                        activation, recompute, True, slots[g.expert]))
        saved.extend(sub.saved_tensors)
        sizes.append(len(sub.saved_tensors))
    ctx.save_for_backward(*saved)
    ctx.sizes, ctx.groups, ctx.activation, ctx.fused_gate_up = sizes, groups, activation, True
    ctx.rows, ctx.dtype, ctx.needs = x.shape[0], x.dtype, needs
    ctx.slices = [(p.shape, p.dtype, p.device) for p in (pg, pu, pd)]
    if not outs:
        return x.new_zeros(x.shape)
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _experts_backward(ctx, dy):
    saved = ctx.saved_tensors
    dx_parts, grads, i = [], None, 0
    for g, n in zip(ctx.groups, ctx.sizes):
        sub = _ExpertCtx(ctx.needs, saved[i:i + n])
        sub.activation, sub.fused_gate_up = ctx.activation, ctx.fused_gate_up
        i += n
        out = _sparse_mlp_backward(sub, dy[g.r0:g.r1])
        dx_parts.append(out[0])
        if grads is None:
            grads = [None if t is None else [] for t in out[7:10]]
        for acc, t in zip(grads, out[7:10]):
            if acc is not None:
                acc.append(t)
    dx = None
    if ctx.needs_input_grad[0]:
        dx = torch.cat(dx_parts) if dx_parts else dy.new_zeros(ctx.rows, dy.shape[-1], dtype=ctx.dtype)
    # every slot belongs to one expert; experts without rows in this call get zero gradients
    dpg, dpu, dpd = (_scatter_slots(None if grads is None else parts, ctx.groups, like, dim) if wanted else None
                     for parts, like, dim, wanted in zip(grads or (None,) * 3, ctx.slices, (0, 0, 1),
                                                         ctx.needs_input_grad[3:6]))
    return dx, None, None, dpg, dpu, dpd, None, None, None, None, None


def _scatter_slots(parts: Optional[List[torch.Tensor]], groups: List[_Group], like: tuple, dim: int) -> torch.Tensor:
    shape, dtype, device = like
    out = torch.zeros(shape, dtype=dtype, device=device)
    for g, t in zip(groups, parts or ()):
        out.narrow(dim, g.s0, g.s1 - g.s0).copy_(t)
    return out


#: the experts' autograd.Function for a device type (``SparseExpertsFunction_cpu``, ...)
_function_for = per_device_function("SparseExpertsFunction", _experts_forward, _experts_backward)


# ----------------------------------------------------------------------------- the experts FFN


@dataclass
class SparseExpertsState:
    """``experts._lape.sparse``: the patched experts forward's override for a MoE layer with
    trainable expert neurons. ``starts[e]:starts[e+1]`` are expert e's slots in the slices."""

    recompute: str = "none"
    starts: List[int] = field(default_factory=list)

    def forward(self, experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        _check_sparse_experts(experts)
        return run_experts(experts, hidden, top_k_index, top_k_weights, _SparseFFN(self))


def _check_sparse_experts(experts: nn.Module) -> None:
    st = experts._lape
    for name in ("gate_up_proj", "down_proj"):
        if getattr(experts, name).requires_grad:
            raise RuntimeError(
                f"experts of decoder layer {st.layer_index}: the stacked expert weights ({name}) require grad while "
                "sparse expert-neuron training is active; only the lape_* slices are trained (re-freeze them, or "
                "unpatch first)"
            )
    if experts.training and torch.is_grad_enabled() and not any(getattr(experts, n).requires_grad for n in PARAM_NAMES):
        warn_frozen_slices()


class _SparseFFN:
    """``experts_forward.ExpertsFFN`` with the trainable slices in place: every implementation's
    rows go through the layer's Function sorted by expert."""

    def __init__(self, st: SparseExpertsState) -> None:
        self.st = st

    def _run(self, experts: nn.Module, x: torch.Tensor, rows_per_expert: Sequence[int]) -> torch.Tensor:
        fn = _function_for(x.device.type)
        return fn.apply(x, experts.gate_up_proj, experts.down_proj, *(getattr(experts, n) for n in PARAM_NAMES),
                        getattr(experts, LOCAL_NAME), getattr(experts, SLOTS_NAME), _groups(self.st, rows_per_expert),
                        experts._lape.activation, self.st.recompute)

    def eager(self, experts, rows, hits, tokens):
        counts = [0] * experts._lape.num_experts
        for e, r in zip(hits, rows):
            counts[e] = r.shape[0]
        y = self._run(experts, torch.cat(rows) if len(rows) != 1 else rows[0], counts)
        return list(y.split([r.shape[0] for r in rows]))

    def grouped(self, experts, rows, row_expert, offsets, row_token):
        ends = offsets.tolist()  # one host sync, as transformers' own grouped fallback
        counts = [b - a for a, b in zip([0] + ends[:-1], ends)]
        # grouped_mm is not autocast-enabled: transformers casts the rows to the weights' dtype and
        # runs the experts in it under autocast too; so do we
        with torch.autocast(rows.device.type, enabled=False):
            return self._run(experts, rows.to(experts.gate_up_proj.dtype), counts)

    def batched(self, experts, rows, row_expert, row_token):
        order = torch.sort(row_expert, stable=True).indices
        counts = torch.bincount(row_expert, minlength=experts._lape.num_experts).tolist()
        y = self._run(experts, rows[order], counts)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return y[inverse]


# ----------------------------------------------------------------------------- install


def install_expert_slices(experts_modules: Sequence[nn.Module], indices: Sequence[Sequence[torch.Tensor]],
                          recompute: str) -> None:
    """Register each MoE layer's trainable slices (initialised from the stacked weights) and its
    override; layers selecting nothing get none."""
    ops = _ops()
    for experts, per_expert in zip(experts_modules, indices):
        counts = [int(t.numel()) for t in per_expert]
        if not sum(counts):
            continue
        gate_up, down = experts.gate_up_proj, experts.down_proj
        E, two_i, _ = gate_up.shape
        inter = two_i // 2
        device = gate_up.device
        local = torch.cat(list(per_expert)).to(device)
        expert = torch.repeat_interleave(torch.arange(E), torch.tensor(counts)).to(device)
        with torch.no_grad():
            experts.register_parameter(PARAM_NAMES[0], nn.Parameter(gate_up[expert, local].clone()))
            experts.register_parameter(PARAM_NAMES[1], nn.Parameter(gate_up[expert, local + inter].clone()))
            experts.register_parameter(PARAM_NAMES[2], nn.Parameter(down[expert, :, local].t().contiguous()))
        experts.register_buffer(INDEX_NAME, expert * inter + local, persistent=True)
        experts.register_buffer(LOCAL_NAME, local, persistent=False)
        experts.register_buffer(SLOTS_NAME, torch.stack([ops.sel_slots(t.to(device), inter) for t in per_expert]),
                                persistent=False)
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        experts._lape.sparse = SparseExpertsState(recompute=recompute, starts=starts)


def clear_expert_slices(experts: nn.Module) -> None:
    """Remove one experts module's slices, buffers and override (their values are discarded)."""
    for name in PARAM_NAMES:
        experts._parameters.pop(name, None)
    for name in (INDEX_NAME, LOCAL_NAME, SLOTS_NAME):
        experts._buffers.pop(name, None)
    st = getattr(experts, "_lape", None)
    if st is not None:
        st.sparse = None


def experts_with_slices(model: nn.Module) -> List[nn.Module]:
    """The patched experts modules that carry trainable slices, in MoE-layer order."""
    return [x for x in patching.patched_experts(model) if getattr(x._lape, "sparse", None) is not None]


def split_flat_index(flat: torch.Tensor, inter: int, num_experts: int) -> List[torch.Tensor]:
    """``lape_neuron_index`` (flat ``expert * I + neuron``, sorted) back to per-expert indices."""
    flat = flat.cpu()
    expert = torch.div(flat, inter, rounding_mode="floor")
    return [flat[expert == e] - e * inter for e in range(num_experts)]
