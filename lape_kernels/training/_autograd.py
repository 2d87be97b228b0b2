"""One ``torch.autograd.Function`` per device type, for training code that must behave under
autocast exactly as the module it replaces.

``torch.amp.custom_fwd`` / ``custom_bwd`` take the device type when the class is made, so a
Function is needed per device type. The cpu and cuda ones are created when the module is
imported: dynamo cannot trace a class statement inside a compiled region, so a compiled
training step must only ever look one up.
"""
from __future__ import annotations

from typing import Callable, Dict, Type

import torch

__all__ = ["per_device_function"]

_EAGER_DEVICE_TYPES = ("cpu", "cuda")


def per_device_function(name: str, forward: Callable, backward: Callable) -> Callable[[str], Type[torch.autograd.Function]]:
    """``function_for(device_type)`` -> the autograd.Function ``{name}_{device_type}`` whose
    forward/backward are ``forward`` / ``backward`` (wrapped in custom_fwd / custom_bwd for that
    device type). Functions for cpu and cuda exist up front; others are made on first use."""

    def make(device_type: str) -> Type[torch.autograd.Function]:
        body = {
            "forward": staticmethod(torch.amp.custom_fwd(device_type=device_type)(forward)),
            "backward": staticmethod(torch.amp.custom_bwd(device_type=device_type)(backward)),
            "__doc__": forward.__doc__,
            "__module__": forward.__module__,
        }
        fn = type(f"{name}_{device_type}", (torch.autograd.Function,), body)
        return fn

    functions: Dict[str, Type[torch.autograd.Function]] = {d: make(d) for d in _EAGER_DEVICE_TYPES}

    def function_for(device_type: str) -> Type[torch.autograd.Function]:
        fn = functions.get(device_type)
        if fn is None:
            fn = functions[device_type] = make(device_type)
        return fn

    return function_for
