"""lape_kernels: fused LAPE counting and sparse language-neuron fine-tuning for HF LLMs.

    import lape_kernels
    lape_kernels.patch(model)
    with lape_kernels.record(model) as stats:
        model(input_ids, attention_mask=mask)
    neurons = lape_kernels.identify({"en": stats_en, "mt": stats_mt})

Public names are loaded lazily so that importing the package is cheap and the pieces that
need the compiled extension only load it when used.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "patch": "patching",
    "unpatch": "patching",
    "is_patched": "patching",
    "supported_model_types": "patching",
    "UnsupportedModelError": "patching",
    "record": "stats",
    "ActivationStats": "stats",
    "StatsByLanguage": "stats",
    "identify": "identify",
    "NeuronSet": "neurons",
    "deactivate": "neurons",
    "merge": "training",
    "save_neurons": "training",
    "load_neurons": "training",
    "trainable_parameters": "training",
    "ops": None,
    "reference": None,
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lape_kernels' has no attribute {name!r}")
    module_name = _EXPORTS[name]
    if module_name is None:
        return importlib.import_module(f".{name}", __name__)
    module = importlib.import_module(f".{module_name}", __name__)
    return getattr(module, name)


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
