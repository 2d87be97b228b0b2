"""``MLPFamily``: where a gated MLP keeps its pieces and how to read gate, up and down from them.

One family object describes every MLP of a model that shares a layout (the names of its Linear
children, the layout of a fused gate/up projection, where the activation lives). Discovery
(``discovery.py``) finds it by structure and proves it by running the module; the registry
(``registry.py``) lets a user name it explicitly. Everything above patching reads an MLP's
weights through these methods, so a new layout changes nothing there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

__all__ = ["MLPFamily", "FUSED_LAYOUTS", "UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """The model has no gated MLP we compute exactly; the message says why and how to check."""


#: rows of a fused gate/up weight: "gate_up" = [gate | up] halves (Phi-3, GLM), "up_gate" = [up | gate],
#: "interleaved" = gate on even rows, up on odd, "interleaved_up_first" = up on even rows
FUSED_LAYOUTS = ("gate_up", "up_gate", "interleaved", "interleaved_up_first")


@dataclass(frozen=True)
class MLPFamily:
    """How one layout of gated MLP is read: ``down(act(gate(x)) * up(x))``.

    ``gate_name``/``up_name`` name separate Linear children; ``gate_up_name`` a fused one (then
    ``fused_layout`` says where gate and up rows are). ``act_name`` is the attribute holding the
    activation (None: the forward calls an ATen function directly, identified by probing).
    """

    name: str
    model_types: Tuple[str, ...] = ()
    gate_name: Optional[str] = "gate_proj"
    up_name: Optional[str] = "up_proj"
    down_name: str = "down_proj"
    gate_up_name: Optional[str] = None
    fused_layout: str = "gate_up"
    act_name: Optional[str] = "act_fn"
    #: the decoder layer's attribute holding this MLP (None: found by structure)
    ffn_name: Optional[str] = None

    def __post_init__(self):
        if self.fused_layout not in FUSED_LAYOUTS:
            raise ValueError(f"fused_layout must be one of {FUSED_LAYOUTS}, got {self.fused_layout!r}")
        if self.gate_up_name is None and (self.gate_name is None or self.up_name is None):
            raise ValueError("an MLPFamily needs gate_name and up_name, or gate_up_name")

    @property
    def fused_gate_up(self) -> bool:
        return self.gate_up_name is not None

    @property
    def linear_names(self) -> Tuple[str, ...]:
        """The Linear children that hold the MLP's weights (e.g. LoRA target modules)."""
        if self.fused_gate_up:
            return (self.gate_up_name, self.down_name)
        return (self.gate_name, self.up_name, self.down_name)

    def check(self, mlp: nn.Module) -> None:
        """Raise ``UnsupportedModelError`` unless ``mlp`` has this family's Linear layers."""
        missing = [n for n in self.linear_names if not isinstance(getattr(mlp, n, None), nn.Linear)]
        if missing:
            raise UnsupportedModelError(
                f"{type(mlp).__name__} is not a gated MLP of family {self.name!r}: missing nn.Linear {missing}"
            )

    # -- reading the MLP --------------------------------------------------------------------------

    def _split_rows(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(gate part, up part) of a fused tensor along dim 0 (weights, biases): views."""
        layout = self.fused_layout
        if layout in ("gate_up", "up_gate"):
            first, second = t.chunk(2, dim=0)
            return (first, second) if layout == "gate_up" else (second, first)
        even, odd = t[0::2], t[1::2]
        return (even, odd) if layout == "interleaved" else (odd, even)

    def _split_columns(self, gu: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(gate, up) of the fused projection's output [T, 2I], each with a contiguous last dim
        (the kernels' requirement: interleaved halves are copied)."""
        layout = self.fused_layout
        if layout in ("gate_up", "up_gate"):
            first, second = gu.chunk(2, dim=-1)
            return (first, second) if layout == "gate_up" else (second, first)
        even, odd = gu[..., 0::2].contiguous(), gu[..., 1::2].contiguous()
        return (even, odd) if layout == "interleaved" else (odd, even)

    def gate_up(self, mlp: nn.Module, x2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """gate and up projections of ``x2`` [T, H] through the module's own Linear layers (the
        fused one is evaluated whole and split, exactly as the module's forward does)."""
        if self.fused_gate_up:
            return self._split_columns(getattr(mlp, self.gate_up_name)(x2))
        return getattr(mlp, self.gate_name)(x2), getattr(mlp, self.up_name)(x2)

    def down(self, mlp: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return getattr(mlp, self.down_name)(h)

    def weights(self, mlp: nn.Module) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Wg [I, H], Wu [I, H], Wd [H, I]) as views of the module's weights."""
        wd = getattr(mlp, self.down_name).weight
        if self.fused_gate_up:
            wg, wu = self._split_rows(getattr(mlp, self.gate_up_name).weight)
            return wg, wu, wd
        return getattr(mlp, self.gate_name).weight, getattr(mlp, self.up_name).weight, wd

    def biases(self, mlp: nn.Module) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(bg [I], bu [I], bd [H]), each None when the Linear has no bias."""
        bd = getattr(mlp, self.down_name).bias
        if self.fused_gate_up:
            b = getattr(mlp, self.gate_up_name).bias
            bg, bu = (None, None) if b is None else self._split_rows(b)
            return bg, bu, bd
        return getattr(mlp, self.gate_name).bias, getattr(mlp, self.up_name).bias, bd

    def gate_rows(self, intermediate: int, sel: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rows of the (fused) gate/up weight holding neurons ``sel``: (gate rows, up rows). For
        separate Linears both are ``sel``."""
        if not self.fused_gate_up:
            return sel, sel
        layout = self.fused_layout
        if layout == "gate_up":
            return sel, sel + intermediate
        if layout == "up_gate":
            return sel + intermediate, sel
        if layout == "interleaved":
            return 2 * sel, 2 * sel + 1
        return 2 * sel + 1, 2 * sel
