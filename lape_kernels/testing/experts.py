"""The shared oracles for mixture-of-experts models (re-exported by ``lape_kernels.testing``):
per-expert LAPE counts recomputed on an unpatched copy, random and "live" expert neuron
selections, the paper's slice training through the stacked expert weights, and the LAPE
reference selection on any units' probabilities.

Nothing here is used by the library itself.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..api import unpatch
from ..introspection import discover
from ..patching import is_patched

__all__ = ["expert_hook_counts", "random_expert_neurons", "live_expert_neurons", "slice_training_experts",
           "lape_reference_select"]


@torch.no_grad()
def expert_hook_counts(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    token_lang: Optional[torch.Tensor] = None,
    num_langs: int = 1,
) -> Dict[str, torch.Tensor]:
    """Per-expert LAPE statistics of one forward, recomputed independently on an UNPATCHED copy:
    a forward pre-hook on each MoE layer's experts module takes the router's choice
    (``top_k_index``) and the hidden states, and each expert's ``act(gate)`` is recomputed with
    the eager loop's own GEMM (``F.linear(x, gate_up_proj[e])``) over the tokens routed to it.
    Padding (``attention_mask == 0``) and language -1 are not counted. Returns ``over_zero``
    int64 / ``act_sum`` float64 ``[num_langs, M, E, I]`` and ``routed`` int64 ``[num_langs, M, E]``
    on the CPU."""
    import torch.nn.functional as F

    ref = copy.deepcopy(model)
    if is_patched(ref):
        unpatch(ref)
    experts = discover(ref, probe=False).experts
    B, S = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, S, dtype=torch.int64, device=input_ids.device)
    lang = torch.zeros(B, S, dtype=torch.int64) if token_lang is None else token_lang.cpu()
    lang = lang[:, None].expand(B, S) if lang.dim() == 1 else lang
    lang = torch.where(attention_mask.cpu().bool(), lang, torch.full_like(lang, -1)).reshape(-1)
    M, E, I = len(experts), experts[0].num_experts, experts[0].intermediate_size
    over_zero = torch.zeros(num_langs, M, E, I, dtype=torch.int64)
    act_sum = torch.zeros(num_langs, M, E, I, dtype=torch.float64)
    routed = torch.zeros(num_langs, M, E, dtype=torch.int64)

    def hook(m: int, x):
        def pre(module: nn.Module, args: tuple) -> None:
            hidden, top_k_index = args[0], args[1]
            for e in range(E):
                tok = torch.where(top_k_index == e)[0]  # the tokens routed to expert e (each once)
                gate = F.linear(hidden[tok], module.gate_up_proj[e]).chunk(2, dim=-1)[0]
                act = x.activation_module(gate) if x.activation_module is not None else module.act_fn(gate)
                tl = lang[tok.cpu()]
                for k in range(num_langs):
                    rows = act[(tl == k).to(act.device)].float()
                    over_zero[k, m, e] += (rows > 0).sum(0).cpu()
                    act_sum[k, m, e] += rows.double().sum(0).cpu()
                    routed[k, m, e] += int((tl == k).sum())
        return pre

    handles = [x.module.register_forward_pre_hook(hook(m, x)) for m, x in enumerate(experts)]
    try:
        ref(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in handles:
            h.remove()
    return {"over_zero": over_zero, "act_sum": act_sum, "routed": routed}


def random_expert_neurons(num_moe_layers: int, num_experts: int, intermediate: int, k: int,
                          seed: int = 0) -> List[List[torch.Tensor]]:
    """Per MoE layer and expert, ``k`` distinct neurons (sorted int64), from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randperm(intermediate, generator=g)[:k].sort().values for _ in range(num_experts)]
            for _ in range(num_moe_layers)]


def live_expert_neurons(model: nn.Module, input_ids: torch.Tensor, k: int, seed: int = 0,
                        labels: Optional[torch.Tensor] = None) -> List[List[torch.Tensor]]:
    """Per MoE layer and expert, up to ``k`` random neurons whose gate row, up row and down column
    all get a clear gradient from a next-token loss on ``input_ids`` (``labels``: the training
    batch's, default ``input_ids``) (a "dead" or unrouted
    neuron's AdamW update is float noise on which two exact methods may disagree; LAPE selects
    active neurons). Sorted int64, from one seeded generator."""
    probe = copy.deepcopy(model)
    if is_patched(probe):
        unpatch(probe)
    experts = discover(probe, probe=False).experts
    for x in experts:
        x.module.gate_up_proj.requires_grad_(True)
        x.module.down_proj.requires_grad_(True)
    probe(input_ids=input_ids, labels=input_ids if labels is None else labels).loss.backward()
    g = torch.Generator().manual_seed(seed)
    out = []
    for x in experts:
        gu, gd = x.module.gate_up_proj.grad.float(), x.module.down_proj.grad.float().transpose(1, 2)
        parts = (gu[:, : x.intermediate_size], gu[:, x.intermediate_size :], gd)
        score = torch.stack([t.abs().amin(-1) / t.abs().amax().clamp_min(1e-30) for t in parts]).amin(0)
        live = [torch.nonzero(s > 1e-4).flatten() for s in score]
        out.append([t[torch.randperm(t.numel(), generator=g)[:k]].sort().values for t in live])
    return out


class _ScatterExpertSlices(nn.Module):
    """Parametrization of a stacked expert weight (``gate_up_proj [E, 2I, H]`` or ``down_proj
    [E, H, I]``): a clone with the selected (expert, neuron) gate/up rows or down columns
    replaced by the trainable slices ``[K, H]`` (gate, up) or ``[H, K]`` (down)."""

    def __init__(self, down: bool, expert: torch.Tensor, neuron: torch.Tensor, slices: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.down = down
        self.register_buffer("expert", expert)
        self.register_buffer("neuron", neuron)
        self.slices = nn.ParameterList([nn.Parameter(s) for s in slices])

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w = w.clone()
        if self.down:  # w[e, :, i] = column of the slice
            w[self.expert, :, self.neuron] = self.slices[0].t()
        else:  # gate rows [0, I), up rows [I, 2I)
            inter = w.shape[1] // 2
            w[self.expert, self.neuron] = self.slices[0]
            w[self.expert, self.neuron + inter] = self.slices[1]
        return w


def slice_training_experts(experts: Sequence, expert_neurons: Sequence[Sequence[torch.Tensor]],
                           params: List[nn.Parameter]) -> None:
    """The expert half of ``testing.slice_training``: parametrize each MoE layer's stacked weights
    (``experts``: ``introspection.ExpertsFFN`` of an unpatched model) with the selected slices,
    appending them to ``params`` (gate rows, up rows, down columns per layer)."""
    from torch.nn.utils import parametrize

    for x, per_expert in zip(experts, expert_neurons):
        counts = [int(t.numel()) for t in per_expert]
        if not sum(counts):
            continue
        gate_up, down = x.module.gate_up_proj, x.module.down_proj
        expert = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(down.device)
        neuron = torch.cat(list(per_expert)).to(down.device)
        gu = _ScatterExpertSlices(False, expert, neuron, [gate_up[expert, neuron].clone(),
                                                          gate_up[expert, neuron + x.intermediate_size].clone()])
        dn = _ScatterExpertSlices(True, expert, neuron, [down[expert, :, neuron].t().contiguous()])
        parametrize.register_parametrization(x.module, "gate_up_proj", gu, unsafe=True)
        parametrize.register_parametrization(x.module, "down_proj", dn, unsafe=True)
        params.extend(list(gu.slices) + list(dn.slices))


def lape_reference_select(probs: torch.Tensor, top_rate: float, filter_rate: float,
                          activation_bar_ratio: float) -> Tuple[torch.Tensor, float, float]:
    """The LAPE reference's selection (RUCAIBox/Language-Specific-Neurons, identify.py), operation
    by operation, on float32 probabilities ``[U, K]`` of any U units (dense neurons, expert
    neurons, or both appended): NaN-to-zero normalisation, entropy with 0 log 0 = 0, kthvalue
    filter, ``topk(largest=False)``, activation bar. Returns (bool ``[U, K]``: unit selected and
    above the bar for language k, filter value, activation bar)."""
    normed = probs / probs.sum(dim=-1, keepdim=True)
    normed[torch.isnan(normed)] = 0
    log_probs = torch.where(normed > 0, normed.log(), 0)
    entropy = -torch.sum(normed * log_probs, dim=-1)
    flat = probs.flatten()
    filter_value = flat.kthvalue(round(len(flat) * filter_rate)).values.item()
    entropy[(probs > filter_value).sum(dim=-1) == 0] = torch.inf
    _, index = entropy.topk(round(len(entropy) * top_rate), largest=False)
    bar = flat.kthvalue(round(len(flat) * activation_bar_ratio)).values.item()
    chosen = torch.zeros(probs.shape[0], dtype=torch.bool)
    chosen[index] = True
    return (probs > bar) & chosen[:, None], filter_value, bar
