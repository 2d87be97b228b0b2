"""Mixture-of-experts feed-forwards: find each decoder layer's routed experts by structure and
prove by running them that every expert computes ``down_e(act(gate_e(x)) * up_e(x))``.

transformers (5.x) stores a layer's experts as one module with stacked 3-D parameters,
``gate_up_proj [E, 2I, H]`` (gate rows first, then up rows) and ``down_proj [E, H, I]``, called
as ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`` after the block's own
router chose the experts; an "experts implementation" (eager loop, grouped or batched GEMMs)
selected by ``config._experts_implementation`` runs them. We keep the router and the block as
they are and only take over that call (``lape_kernels.experts_forward``), so routing is the
model's own, bit for bit.

Structure proposes, the probe decides: variants whose math differs (biases, transposed or
interleaved weights, a clamped or scaled gate as in GPT-OSS, a norm after each expert) are
refused with the reason before anything runs; the rest is run on a random input and routing and
compared with our reading.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .activations import UnknownActivation, kernel_activation
from .family import UnsupportedModelError

__all__ = ["ExpertsFFN", "ExpertShape", "EXPERTS_IMPLEMENTATIONS", "find_experts", "prove_experts",
           "experts_implementation", "expert_weights", "experts_problems"]

#: the experts implementations our patched forward mirrors (transformers' names)
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
_PROBE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@dataclass(frozen=True)
class ExpertsFFN:
    """One decoder layer's routed experts, read (and proven)."""

    layer_index: int
    path: str
    module: nn.Module
    activation: str
    #: the module computing act(gate) (what a reference hook observes)
    activation_module: Optional[nn.Module]
    num_experts: int
    intermediate_size: int
    hidden_size: int


class ExpertShape(NamedTuple):
    """A model's routed experts as their weights are: what expert neuron indices refer to."""

    layers: Tuple[int, ...]
    num_experts: int
    hidden_size: int
    intermediate_size: int


def experts_implementation(experts: nn.Module) -> str:
    """The experts implementation the module's forward dispatches to (``eager`` when unset)."""
    config = getattr(experts, "config", None)
    impl = getattr(config, "_experts_implementation", None)
    return impl or "eager"


def expert_weights(experts: nn.Module, e: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Wg [I, H], Wu [I, H], Wd [H, I]) of expert ``e``, as views of the stacked weights."""
    gate_up = experts.gate_up_proj[e]
    inter = gate_up.shape[0] // 2
    return gate_up[:inter], gate_up[inter:], experts.down_proj[e]


def _is_experts_module(module: nn.Module) -> bool:
    return isinstance(getattr(module, "gate_up_proj", None), torch.Tensor) or \
        isinstance(getattr(module, "down_proj", None), nn.Parameter)


def experts_problems(experts: nn.Module) -> List[str]:
    """What makes this experts module compute something else than act(gate) * up per expert."""
    from transformers.integrations import moe as hf_moe

    problems = []
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(down, torch.Tensor):
        return ["its weights are not stacked gate_up_proj / down_proj tensors (has_gate=False or another layout)"]
    flags = {"has_bias": False, "is_transposed": False, "has_post_expert_norm": False, "_is_expert_parallel": False}
    for name, want in flags.items():
        if bool(getattr(experts, name, want)) != want:
            problems.append(f"{name}={not want}")
    if not getattr(experts, "is_concatenated", True):
        problems.append("gate and up rows are interleaved (is_concatenated=False)")
    if not getattr(experts, "has_gate", True):
        problems.append("it has no gate (has_gate=False)")
    if getattr(type(experts), "_apply_gate", hf_moe._default_apply_gate) is not hf_moe._default_apply_gate:
        problems.append(f"{type(experts).__name__}._apply_gate is its own gating (e.g. clamped, alpha-scaled sigmoid), "
                        "not act(gate) * up")
    if not problems:
        if gu.dim() != 3 or down.dim() != 3 or gu.shape[0] != down.shape[0] or gu.shape[1] != 2 * down.shape[2] \
                or gu.shape[2] != down.shape[1]:
            problems.append(f"gate_up_proj {tuple(gu.shape)} / down_proj {tuple(down.shape)} are not [E, 2I, H] / "
                            "[E, H, I]")
    own = [n for n, _ in experts.named_parameters(recurse=False) if n not in ("gate_up_proj", "down_proj")
           and not n.startswith("lape_")]
    if own:
        problems.append(f"it has parameters {own} besides gate_up_proj and down_proj")
    if list(experts.children()) and any(list(c.parameters()) for c in experts.children()):
        problems.append("it has submodules with parameters")
    impl = experts_implementation(experts)
    if impl not in EXPERTS_IMPLEMENTATIONS:
        problems.append(f"experts implementation {impl!r} (supported: {', '.join(EXPERTS_IMPLEMENTATIONS)})")
    return problems


def find_experts(moe: nn.Module) -> Optional[Tuple[str, nn.Module]]:
    """(name, module) of the experts inside a MoE block: the descendant named ``experts`` holding
    stacked weights (None: none recognisable)."""
    found = [(n, m) for n, m in moe.named_modules() if n and n.rpartition(".")[2] == "experts"]
    if len(found) == 1 and _is_experts_module(found[0][1]):
        return found[0]
    return None


def _activation(experts: nn.Module, where: str) -> Tuple[str, Optional[nn.Module]]:
    act = getattr(experts, "act_fn", None)
    if act is None:
        raise UnsupportedModelError(f"{where}: the experts have no act_fn")
    try:
        return kernel_activation(act), act if isinstance(act, nn.Module) else None
    except UnknownActivation as exc:
        raise UnsupportedModelError(f"{where}: experts act_fn: {exc}") from None


def _reference(experts: nn.Module, act, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Our reading of the experts on ``x`` with routing ``idx``/``w``: per token, the weighted
    sum over its experts of down_e(act(gate_e x) * up_e x)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(experts.gate_up_proj.shape[0]):
        tok, pos = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        wg, wu, wd = expert_weights(experts, e)
        h = act(F.linear(x[tok], wg)) * F.linear(x[tok], wu)
        out.index_add_(0, tok, (F.linear(h, wd) * w[tok, pos, None]).float())
    return out.to(x.dtype)


@torch.no_grad()
def prove_experts(experts: nn.Module, layer_index: int, path: str, where: str, probe: bool = True) -> ExpertsFFN:
    """The experts of one layer, or ``UnsupportedModelError`` saying why their math is not ours."""
    problems = experts_problems(experts)
    if problems:
        raise UnsupportedModelError(f"{where}: experts {path} ({type(experts).__name__}) are not act(gate) * up per "
                                    "expert: " + "; ".join(problems))
    kernel, act_module = _activation(experts, where)
    E, two_i, H = experts.gate_up_proj.shape
    ffn = ExpertsFFN(layer_index, path, experts, kernel, act_module, int(E), int(two_i) // 2, int(H))
    wt = experts.gate_up_proj
    if not probe or wt.is_meta:
        return ffn
    with torch.autocast(wt.device.type, enabled=False):
        g = torch.Generator().manual_seed(4321)
        T, k = 16, min(2, int(E))
        x = (torch.randn(T, H, generator=g) * torch.logspace(-1.3, 1.0, T)[:, None]).to(wt.device, wt.dtype)
        idx = torch.stack([torch.randperm(int(E), generator=g)[:k] for _ in range(T)]).to(wt.device)
        w = torch.rand(T, k, generator=g).to(wt.device, wt.dtype)
        try:
            want = type(experts).forward(experts, x, idx, w)
        except Exception as exc:  # noqa: BLE001 - any failure: not the experts call we know
            raise UnsupportedModelError(f"{where}: calling {type(experts).__name__}.forward(hidden, top_k_index, "
                                        f"top_k_weights) failed ({type(exc).__name__}: {str(exc)[:120]})") from None
        act = act_module if act_module is not None else experts.act_fn
        got = _reference(experts, act, x, idx, w)
    err = 0.0 if torch.equal(got, want) else (
        float((got.float() - want.float()).abs().max()) / (float(want.float().abs().max()) or 1.0)
        if got.shape == want.shape else float("inf"))
    if err > _PROBE_TOLERANCE.get(wt.dtype, 1e-5):
        raise UnsupportedModelError(f"{where}: {type(experts).__name__}.forward is not the routed sum of "
                                    f"down_e(act(gate_e x) * up_e x) (relative difference {err:.2g}): it computes "
                                    "something else")
    return ffn
