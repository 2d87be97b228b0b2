"""Which tokens fed during ``generate()`` belong to a sequence.

Hugging Face's ``generate`` keeps running the whole batch until every sequence is done: a
sequence that produced its end-of-sequence token is fed ``pad_token_id`` from then on, with
attention mask 1, so the mask alone cannot tell those tokens from real ones. ``record()``
watches ``generate`` (an instance attribute on the model for the length of the block) to learn
the ids that end a sequence in this call, and counts a sequence's generated tokens up to and
including its first end-of-sequence token.

Only ends by an EOS id are known here: sequences stopped by other criteria (``stop_strings``,
a custom ``StoppingCriteria``, ``max_time``) keep being counted on the pads that follow.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["GenerateWatch", "eos_token_ids"]


def eos_token_ids(model: nn.Module, generate_signature: Optional[inspect.Signature], args: tuple,
                  kwargs: dict) -> Optional[torch.Tensor]:
    """The ids that end a sequence in ``model.generate(*args, **kwargs)``: its ``eos_token_id``
    argument, else the ``generation_config`` argument's, else the model's generation config's.
    int64 CPU tensor, or None when nothing ends a sequence."""
    if "eos_token_id" in kwargs:
        eos = kwargs["eos_token_id"]
    else:
        config = kwargs.get("generation_config")
        if config is None and generate_signature is not None:
            try:
                config = generate_signature.bind_partial(*args, **kwargs).arguments.get("generation_config")
            except TypeError:
                config = None
        if config is None:
            config = getattr(model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return None
    ids = torch.as_tensor(eos, dtype=torch.int64).reshape(-1).cpu()
    return ids if ids.numel() else None


class GenerateWatch:
    """Tracks, during one ``generate()`` call, which sequences have ended."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.active = False
        self.eos: Optional[torch.Tensor] = None
        self._eos_on: dict = {}
        self.ended: Optional[torch.Tensor] = None  # bool [B] once the prompt has been fed
        self._wrapper: Any = None
        self._previous: Any = None

    # -- the generate() wrapper ------------------------------------------------------------------
    def install(self) -> None:
        original = getattr(self.model, "generate", None)
        if not callable(original):
            return
        try:
            signature: Optional[inspect.Signature] = inspect.signature(original)
        except (TypeError, ValueError):
            signature = None
        self._previous = self.model.__dict__.get("generate")

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            outer = (self.active, self.eos, self.ended, self._eos_on)
            self.active, self.ended, self._eos_on = True, None, {}
            self.eos = eos_token_ids(self.model, signature, args, kwargs)
            try:
                return original(*args, **kwargs)
            finally:
                self.active, self.eos, self.ended, self._eos_on = outer

        self._wrapper = generate
        self.model.generate = generate

    def uninstall(self) -> None:
        if self._wrapper is not None and self.model.__dict__.get("generate") is self._wrapper:
            if self._previous is None:
                del self.model.generate
            else:
                self.model.generate = self._previous
        self._wrapper = self._previous = None
        self.active = False

    # -- per forward -----------------------------------------------------------------------------
    def sequence_tokens(self, input_ids: torch.Tensor, valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``valid`` (bool [B, S], or None = all) restricted to the tokens that belong to a
        sequence. The first forward of a ``generate`` call feeds the prompt (counted as the
        mask says); later forwards feed generated tokens, which count until the sequence's
        first EOS (included)."""
        if input_ids.dim() != 2:
            return valid
        B = input_ids.shape[0]
        if self.ended is None or self.ended.shape[0] != B or self.ended.device != input_ids.device:
            self.ended = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
            return valid  # the prompt
        if self.eos is None:
            return valid
        eos = self._eos_on.get(input_ids.device)
        if eos is None:
            eos = self._eos_on[input_ids.device] = self.eos.to(input_ids.device)
        is_end = torch.isin(input_ids, eos)
        ends_before = (is_end.cumsum(1) - is_end.long()) > 0  # an EOS earlier in this forward
        keep = ~(self.ended[:, None] | ends_before)
        self.ended = self.ended | is_end.any(1)
        return keep if valid is None else valid & keep
