"""lape_kernels: fused LAPE counting and sparse language-neuron fine-tuning for HF LLMs.

    import lape_kernels as lk
    lk.patch(model)
    with lk.record(model) as stats:
        model(input_ids, attention_mask=mask)
    neurons = lk.identify({"en": stats_en, "mt": stats_mt})

Every public name is bound here once, at import, so ``lk.<name>`` is the same object on every
lookup whatever else was imported (no submodule carries a public name). The compiled extension
is loaded when an op first runs (``lape_kernels.kernels.ops``).
"""
from __future__ import annotations

from .version import __version__

from .api import patch, unpatch
from .fingerprint import ModelMismatchError, model_fingerprint
from .introspection import UnsupportedModelError, check_model, supported_model_types
from .neurons import NeuronSet, deactivate, identify
from .patching import is_patched
from .stats import ActivationStats, StatsByLanguage, record
from .training import load_neurons, merge, save_neurons, trainable_parameters


def __getattr__(name: str):
    # the kernel modules load the compiled extension: only when asked for
    if name in ("ops", "reference"):
        import importlib

        module = importlib.import_module(f".kernels.{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'lape_kernels' has no attribute {name!r}")


__all__ = [
    "ActivationStats",
    "ModelMismatchError",
    "NeuronSet",
    "StatsByLanguage",
    "UnsupportedModelError",
    "check_model",
    "deactivate",
    "identify",
    "is_patched",
    "load_neurons",
    "merge",
    "model_fingerprint",
    "ops",
    "patch",
    "record",
    "reference",
    "save_neurons",
    "supported_model_types",
    "trainable_parameters",
    "unpatch",
]
