"""The end-to-end experiment behind ``lape-kernels collect / identify / finetune / eval / demo``:
statistics, identification, fine-tuning with the paper's baselines, evaluation and a report.

Modules by concern: ``config`` (the settings of each command; they generate the CLI options),
``collect``, ``methods`` + ``finetune`` (training), ``runs`` (the run directory), ``metrics`` and
``evaluate``, ``report``, ``demo``; plumbing: ``errors``, ``outputs`` (atomic writes), ``inputs``
(model, corpus, packing), ``runtime`` (device/dtype/autocast), ``progress``.
"""
from __future__ import annotations

__all__ = ["collect", "identify_neurons", "finetune", "FinetuneConfig", "evaluate", "write_report", "run_demo",
           "ExperimentError"]


def __getattr__(name: str):
    import importlib

    where = {"collect": "collect", "identify_neurons": "collect", "finetune": "finetune",
             "FinetuneConfig": "config", "evaluate": "evaluate", "write_report": "report",
             "run_demo": "demo", "ExperimentError": "errors"}
    if name not in where:
        raise AttributeError(f"module 'lape_kernels.experiment' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{where[name]}", __name__), name)
