"""LAPE statistics of the routed experts of a mixture-of-experts model (``ActivationStats.experts``).

Per MoE layer, expert and expert neuron: ``over_zero`` (tokens routed to the expert whose
act(gate) > 0, int64) and ``act_sum`` (their act(gate) summed, float64), and per layer and
expert ``routed`` (non-padding tokens routed to it: the language's routing frequency). A token
routed to k experts counts once for each. The activation probability of an expert neuron is
``over_zero / routed``: relative to the tokens the expert actually saw (see the README's MoE
section for why, and for what dividing by all tokens would change).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch

__all__ = ["ExpertStats"]


def _tensor(x: Any, name: str, dims: int, integer: bool) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"experts.{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"experts.{name} must be {dims}-D, got shape {tuple(x.shape)}")
    if integer and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise TypeError(f"experts.{name} must be an integer tensor (counts), got {x.dtype}")
    if not integer and not x.dtype.is_floating_point:
        raise TypeError(f"experts.{name} must be a floating-point tensor, got {x.dtype}")
    return x.to(torch.int64 if integer else torch.float64)


class ExpertStats:
    """``layers`` (decoder-layer indices of the MoE layers), ``over_zero`` int64 and ``act_sum``
    float64 (or None) ``[len(layers), num_experts, intermediate]``, ``routed`` int64
    ``[len(layers), num_experts]``. Checked on construction: every count lies in [0, routed]
    and a layer routes no more than ``n_tokens`` tokens to one expert."""

    def __init__(self, layers: Sequence[int], over_zero: torch.Tensor, act_sum: Optional[torch.Tensor],
                 routed: torch.Tensor, n_tokens: Optional[int] = None) -> None:
        layers = tuple(int(v) for v in layers)
        if list(layers) != sorted(set(layers)) or any(v < 0 for v in layers):
            raise ValueError(f"experts.layers must be sorted unique layer indices, got {list(layers)}")
        over_zero = _tensor(over_zero, "over_zero", 3, True)
        routed = _tensor(routed, "routed", 2, True)
        if over_zero.shape[0] != len(layers) or tuple(routed.shape) != tuple(over_zero.shape[:2]):
            raise ValueError(f"experts: over_zero {tuple(over_zero.shape)} / routed {tuple(routed.shape)} do not fit "
                             f"{len(layers)} layers ([layers, experts, intermediate] / [layers, experts])")
        if act_sum is not None:
            act_sum = _tensor(act_sum, "act_sum", 3, False)
            if act_sum.shape != over_zero.shape:
                raise ValueError(f"experts.act_sum shape {tuple(act_sum.shape)} does not match over_zero "
                                 f"{tuple(over_zero.shape)}")
        if routed.numel() and int(routed.min()) < 0:
            raise ValueError("experts.routed has negative counts")
        if over_zero.numel():
            if int(over_zero.min()) < 0:
                raise ValueError("experts.over_zero has negative counts")
            if bool((over_zero > routed[..., None]).any()):
                raise ValueError("experts.over_zero has counts above the tokens routed to the expert (experts.routed): "
                                 "counts and routing must come from the same tokens")
        if n_tokens is not None and routed.numel() and int(routed.max()) > n_tokens:
            raise ValueError(f"experts.routed has an expert with {int(routed.max())} tokens, above n_tokens={n_tokens}")
        self.layers = layers
        self.over_zero = over_zero
        self.act_sum = act_sum
        self.routed = routed

    @property
    def num_experts(self) -> int:
        return self.over_zero.shape[1]

    @property
    def intermediate_size(self) -> int:
        return self.over_zero.shape[2]

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.over_zero.shape)  # type: ignore[return-value]

    def key(self) -> Tuple[Tuple[int, ...], Tuple[int, int, int]]:
        """What must agree for statistics to combine: the layers and the shape."""
        return self.layers, self.shape

    def activation_probability(self) -> torch.Tensor:
        """P(act(gate) > 0 | routed to the expert), float32 [M, E, I]; 0 for an expert no token
        was routed to (no evidence of activity)."""
        n = self.routed[..., None]
        p = self.over_zero.to(torch.float64) / n.clamp(min=1)
        return torch.where(n > 0, p, torch.zeros((), dtype=p.dtype)).to(torch.float32)

    def mean_activation(self) -> torch.Tensor:
        """Mean act(gate) over the tokens routed to the expert, float32 [M, E, I] (0 where none)."""
        if self.act_sum is None:
            raise ValueError("mean_activation: these expert statistics carry no act_sum")
        n = self.routed[..., None]
        return torch.where(n > 0, self.act_sum / n.clamp(min=1), torch.zeros((), dtype=torch.float64)).to(torch.float32)

    def __add__(self, other: "ExpertStats") -> "ExpertStats":
        if self.key() != other.key():
            raise ValueError(f"cannot add expert statistics of layers {list(self.layers)} shape {list(self.shape)} and "
                             f"layers {list(other.layers)} shape {list(other.shape)} (different models?)")
        act_sum = None if self.act_sum is None or other.act_sum is None else self.act_sum + other.act_sum
        return ExpertStats(self.layers, self.over_zero + other.over_zero, act_sum, self.routed + other.routed)

    def equal(self, other: Optional["ExpertStats"]) -> bool:
        if other is None or self.key() != other.key():
            return False
        if not (torch.equal(self.over_zero, other.over_zero) and torch.equal(self.routed, other.routed)):
            return False
        if (self.act_sum is None) != (other.act_sum is None):
            return False
        return self.act_sum is None or torch.equal(self.act_sum, other.act_sum)

    # -- files (inside an ActivationStats safetensors file) -------------------------------------
    def tensors(self) -> Dict[str, torch.Tensor]:
        out = {"experts.over_zero": self.over_zero.contiguous(), "experts.routed": self.routed.contiguous()}
        if self.act_sum is not None:
            out["experts.act_sum"] = self.act_sum.contiguous()
        return out

    @classmethod
    def from_tensors(cls, layers: Sequence[int], tensors: Dict[str, torch.Tensor],
                     n_tokens: Optional[int] = None) -> "ExpertStats":
        missing = [k for k in ("experts.over_zero", "experts.routed") if k not in tensors]
        if missing:
            raise ValueError(f"expert statistics without {missing}")
        return cls(layers, tensors["experts.over_zero"], tensors.get("experts.act_sum"), tensors["experts.routed"],
                   n_tokens)

    def __repr__(self) -> str:
        return (f"ExpertStats(layers={list(self.layers)}, experts={self.num_experts}, "
                f"intermediate={self.intermediate_size}, routed={int(self.routed.sum())})")
