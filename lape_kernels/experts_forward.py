"""The patched forward of a mixture-of-experts layer's routed experts (patching's MoE half).

The block's own router picks each token's experts; its experts module is then called as
``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``. We replace that call on the
instance by the same computation as the experts implementation the model selected (``eager``
loop, ``grouped_mm`` or ``batched_mm``: the same GEMM calls, so the same bits) with the
experts' ``act(gate) * up`` done by our op, which counts while it computes:

- grouped / batched: the rows of all experts go through one ``act_mul_count`` whose "language"
  of a row is ``expert * K + language``: one kernel call counts every (expert, language) pair;
- eager: one ``act_mul_count`` per expert over the tokens routed to it, as the loop runs.

A token routed to k experts counts once for each (top-k). ``routed [K, E]`` counts the
(token, expert) pairs per language; padding (language -1) is counted nowhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .introspection import EXPERTS_IMPLEMENTATIONS, experts_implementation

__all__ = ["PatchedExpertsState", "ExpertsFFN", "lape_experts_forward", "run_experts", "routed_counts"]


@dataclass
class PatchedExpertsState:
    """``experts._lape``: what the patched experts forward needs. Plain Python."""

    #: position among the model's MoE layers, and the decoder layer it is in
    moe_index: int
    layer_index: int
    activation: str
    num_experts: int
    intermediate_size: int
    recorder: Any = None
    #: set by ``deactivate``: bool [E, I] on the weights' device, True = zeroed
    deactivated: Optional[torch.Tensor] = None
    #: set by sparse training: an object with ``forward(experts, hidden, top_k_index, top_k_weights)``
    #: (which routes through :func:`run_experts` with its own :class:`ExpertsFFN`)
    sparse: Any = None


def routed_counts(top_k_index: torch.Tensor, token_lang: Optional[torch.Tensor], num_langs: int,
                  num_experts: int) -> torch.Tensor:
    """int64 [num_langs, E]: (token, expert) pairs per language (language -1 counted nowhere),
    without a host sync."""
    k = top_k_index.shape[-1]
    experts = top_k_index.reshape(-1).to(torch.int64)
    if token_lang is None:
        bucket = experts + 1
    else:
        lang = token_lang.repeat_interleave(k)
        bucket = torch.where(lang >= 0, experts * num_langs + lang + 1, 0)
    out = torch.zeros(num_experts * num_langs + 1, dtype=torch.int64, device=experts.device)
    out.index_add_(0, bucket, torch.ones_like(bucket))
    if token_lang is None:  # language 0 only
        counts = torch.zeros(num_langs, num_experts, dtype=torch.int64, device=experts.device)
        counts[0] = out[1:]
        return counts
    return out[1:].view(num_experts, num_langs).t()


def _ops():
    from .kernels import ops

    return ops


class _Counts:
    """One call's per-expert counts: over_zero int64 / act_sum float64 [K, E, I]."""

    def __init__(self, st: PatchedExpertsState, num_langs: int, device: torch.device) -> None:
        shape = (num_langs, st.num_experts, st.intermediate_size)
        self.num_langs = num_langs
        self.over_zero = torch.zeros(shape, dtype=torch.int64, device=device)
        self.act_sum = torch.zeros(shape, dtype=torch.float64, device=device)


def _act_mul(st: PatchedExpertsState, gate: torch.Tensor, up: torch.Tensor, row_lang: Optional[torch.Tensor],
             counts: Optional[_Counts], expert: Optional[int], row_expert: Optional[torch.Tensor]) -> torch.Tensor:
    """act(gate) * up of rows of one expert (``expert``) or of many (``row_expert`` [S]),
    counted into ``counts`` when recording; deactivated neurons zeroed."""
    ops = _ops()
    if counts is None:
        h = ops.act_mul(gate, up, st.activation)
    else:
        K, E = counts.num_langs, st.num_experts
        if expert is not None:
            h, oz, s = ops.act_mul_count(gate, up, st.activation, row_lang, K)
            counts.over_zero[:, expert] += oz
            counts.act_sum[:, expert] += s
        else:  # one bucket per (expert, language)
            rows = row_expert.to(torch.int64)
            bucket = rows * K if row_lang is None else torch.where(row_lang >= 0, rows * K + row_lang, -1)
            h, oz, s = ops.act_mul_count(gate, up, st.activation, bucket, E * K)
            counts.over_zero += oz.view(E, K, -1).transpose(0, 1)
            counts.act_sum += s.view(E, K, -1).transpose(0, 1)
    if st.deactivated is not None:
        mask = st.deactivated[expert] if expert is not None else st.deactivated[row_expert]
        h = h.masked_fill(mask, 0.0)
    return h


class ExpertsFFN(Protocol):
    """The experts' per-row computation ``down_e(act(gate_e x) * up_e x)`` inside the routing of one
    experts implementation (the routing, the routing weights and the sum are the implementation's
    own, in ``_eager`` / ``_grouped`` / ``_batched``). The patched forward uses the module's own
    GEMMs with our act·mul (:class:`_OwnGEMMs`); sparse training plugs in its own
    (``lape_kernels.training.sparse_experts``)."""

    def eager(self, experts: nn.Module, rows: List[torch.Tensor], hits: List[int],
              tokens: List[torch.Tensor]) -> List[torch.Tensor]:
        """The eager loop's per-expert outputs: ``rows[j]`` are the hidden states of the tokens
        ``tokens[j]`` routed to expert ``hits[j]`` (experts in ascending order)."""
        ...

    def grouped(self, experts: nn.Module, rows: torch.Tensor, row_expert: torch.Tensor, offsets: torch.Tensor,
                row_token: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert (``row_expert`` ascending, ``offsets`` the int32 cumulative counts)."""
        ...

    def batched(self, experts: nn.Module, rows: torch.Tensor, row_expert: torch.Tensor,
                row_token: torch.Tensor) -> torch.Tensor:
        """Rows in token order, each token repeated top-k times (``row_expert`` its experts)."""
        ...


class _OwnGEMMs:
    """The module's own GEMMs (the same calls as the implementation), act(gate) * up by our op,
    counted into ``counts`` when recording; deactivated neurons zeroed."""

    def __init__(self, st: PatchedExpertsState, token_lang: Optional[torch.Tensor], counts: Optional[_Counts]) -> None:
        self.st, self.token_lang, self.counts = st, token_lang, counts

    def _lang(self, row_token: torch.Tensor) -> Optional[torch.Tensor]:
        return None if self.token_lang is None else self.token_lang[row_token]

    def eager(self, experts, rows, hits, tokens):
        out = []
        for e, current_state, token_idx in zip(hits, rows, tokens):
            gate, up = F.linear(current_state, experts.gate_up_proj[e]).chunk(2, dim=-1)
            h = _act_mul(self.st, gate, up, self._lang(token_idx), self.counts, e, None)
            out.append(F.linear(h, experts.down_proj[e]))
        return out

    def grouped(self, experts, rows, row_expert, offsets, row_token):
        from transformers.integrations.moe import _grouped_linear

        proj_out = _grouped_linear(rows, experts.gate_up_proj, offsets, bias=None, is_transposed=False)
        gate, up = proj_out.chunk(2, dim=-1)
        proj_out = _act_mul(self.st, gate, up, self._lang(row_token), self.counts, None, row_expert)
        return _grouped_linear(proj_out, experts.down_proj, offsets, bias=None, is_transposed=False)

    def batched(self, experts, rows, row_expert, row_token):
        from transformers.integrations.moe import _batched_linear

        proj_out = _batched_linear(rows, experts.gate_up_proj[row_expert], bias=None, is_transposed=False)
        gate, up = proj_out.chunk(2, dim=-1)
        proj_out = _act_mul(self.st, gate, up, self._lang(row_token), self.counts, None, row_expert)
        return _batched_linear(proj_out, experts.down_proj[row_expert], bias=None, is_transposed=False)


def _eager(self: nn.Module, hidden_states, top_k_index, top_k_weights, ffn: ExpertsFFN):
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1)
        expert_mask = expert_mask.permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    hits, positions, tokens = [], [], []
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        hits.append(int(expert_idx))
        positions.append(top_k_pos)
        tokens.append(token_idx)
    outs = ffn.eager(self, [hidden_states[t] for t in tokens], hits, tokens)
    for h, top_k_pos, token_idx in zip(outs, positions, tokens):
        h = h * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, h.to(final_hidden_states.dtype))
    return final_hidden_states


def _grouped(self: nn.Module, hidden_states, top_k_index, top_k_weights, ffn: ExpertsFFN):
    device = hidden_states.device
    num_top_k = top_k_index.size(-1)
    num_tokens = hidden_states.size(0)
    hidden_dim = hidden_states.size(-1)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    token_g = perm // num_top_k
    selected_hidden_states_g = hidden_states[token_g]
    sample_weights_g = sample_weights[perm]
    histc_input = expert_ids_g.float() if device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(histc_input, bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    proj_out = ffn.grouped(self, selected_hidden_states_g, expert_ids_g, offsets, token_g)
    weighted_out = proj_out * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=device)
    weighted_out = weighted_out[inv_perm]
    final_hidden_states = weighted_out.view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
    return final_hidden_states.to(hidden_states.dtype)


def _batched(self: nn.Module, hidden_states, top_k_index, top_k_weights, ffn: ExpertsFFN):
    num_top_k = top_k_index.size(-1)
    num_tokens = hidden_states.size(0)
    hidden_dim = hidden_states.size(-1)
    selected_hidden_states = hidden_states.repeat_interleave(num_top_k, dim=0)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    row_token = torch.arange(num_tokens, device=hidden_states.device).repeat_interleave(num_top_k)
    proj_out = ffn.batched(self, selected_hidden_states, expert_ids, row_token)
    weighted_out = proj_out * sample_weights.unsqueeze(-1)
    final_hidden_states = weighted_out.view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
    return final_hidden_states.to(hidden_states.dtype)


_IMPLEMENTATIONS = {"eager": _eager, "grouped_mm": _grouped, "batched_mm": _batched}
assert tuple(_IMPLEMENTATIONS) == EXPERTS_IMPLEMENTATIONS


def run_experts(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor, ffn: ExpertsFFN) -> torch.Tensor:
    """The experts call as the selected implementation routes it, with ``ffn`` computing each
    expert's rows (what sparse training's override calls)."""
    st: PatchedExpertsState = experts._lape
    impl = experts_implementation(experts)
    run = _IMPLEMENTATIONS.get(impl)
    if run is None:
        raise RuntimeError(f"experts of decoder layer {st.layer_index}: experts implementation {impl!r} is not one "
                           f"lape_kernels computes ({', '.join(EXPERTS_IMPLEMENTATIONS)}); set another with "
                           "model.set_experts_implementation(...) or unpatch")
    if getattr(experts, "_is_expert_parallel", False):
        raise RuntimeError(f"experts of decoder layer {st.layer_index}: expert parallelism is not supported")
    return run(experts, hidden_states, top_k_index, top_k_weights, ffn)


def lape_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """The patched experts forward: the selected implementation's computation, act(gate) * up by
    our op (+ per-expert LAPE counting when recording)."""
    st: PatchedExpertsState = self._lape
    if st.sparse is not None:
        return st.sparse.forward(self, hidden_states, top_k_index, top_k_weights)
    token_lang, counts = None, None
    if st.recorder is not None:
        token_lang, num_langs = st.recorder.token_lang(hidden_states.shape[0], hidden_states.device)
        counts = _Counts(st, num_langs, hidden_states.device)
    out = run_experts(self, hidden_states, top_k_index, top_k_weights, _OwnGEMMs(st, token_lang, counts))
    if counts is not None:
        routed = routed_counts(top_k_index, token_lang, counts.num_langs, st.num_experts)
        st.recorder.accumulate_experts(st.moe_index, counts.over_zero, counts.act_sum, routed)
    return out
