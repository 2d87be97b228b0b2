"""Evaluation of a fine-tuning run: what it bought (target-language perplexity), what it cost
(other languages' perplexity), how it moved the representations (cross-lingual alignment with
English) and where it changed the weights (per-layer relative update norms).

Every measure is taken on the base model ("before") and on the base model with the run's best
checkpoint merged in ("after"), with the same packed validation text.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from ..files import claim_output
from .config import EvalConfig
from .errors import ExperimentError
from .inputs import load_corpus, load_model, pack_validation, parallel_pairs, validation_digests
from .metrics import alignment, language_perplexities, snapshot_weights, update_norms
from .outputs import write_json_atomic
from .progress import now
from .runs import apply_run, load_run_info
from .safety import check_same_model
from .runtime import autocast as amp_ctx, dtype_name, eval_loss_chunk, parse_autocast, parse_device, parse_dtype

__all__ = ["EVAL_FORMAT", "Evaluator", "evaluate", "evaluate_config", "write_eval"]

EVAL_FORMAT = "lape_kernels.eval"


class Evaluator:
    """One base model and one packed validation set, measured before and after several runs.

    The base weights are snapshotted once; ``after(run)`` restores them, merges the run, measures,
    and the next call starts from the base again (so one model load serves every run).
    """

    def __init__(self, model_spec: str, data: Optional[str], languages: Sequence[str], target: str, *,
                 seq_len: int = 512, val_tokens: int = 8192, batch_size: int = 4, parallel_n: int = 32,
                 align_with: str = "en", device: str = "auto", dtype: str = "auto", autocast: str = "none",
                 cache_dir: Optional[str] = None, quiet: bool = False):
        languages = list(languages)
        if target not in languages:
            languages.append(target)
        if seq_len < 2 or val_tokens < seq_len or batch_size <= 0:
            raise ExperimentError(f"need --seq-len >= 2, --val-tokens >= --seq-len ({val_tokens} < {seq_len}?) "
                                  f"and a positive --batch-size")
        self.dev = parse_device(device)
        self.dt = parse_dtype(dtype, self.dev, auto=torch.float32)
        self.amp = parse_autocast(autocast, self.dev)
        self.model_spec, self.target, self.languages = model_spec, target, languages
        self.batch_size, self.quiet = batch_size, quiet
        corpus = load_corpus(data, languages, cache_dir=cache_dir)
        self.model, self.tokenizer = load_model(model_spec, self.dt, self.dev, cache_dir)
        for p in self.model.parameters():  # nothing trains here (see runtime.no_param_grads)
            p.requires_grad_(False)
        self.packed = pack_validation(self.tokenizer, corpus, languages, seq_len, val_tokens)
        validation_text = validation_digests(corpus, languages)
        pairs = None
        if align_with != target and parallel_n > 0:
            pairs = parallel_pairs(data, target, align_with, parallel_n, cache_dir)
            if not pairs[0]:
                pairs = None
        self.pairs = pairs
        self.settings = {"model": model_spec, "data": data or "builtin", "languages": languages, "target": target,
                         "seq_len": seq_len, "val_tokens": val_tokens, "parallel_n": parallel_n,
                         "align_with": align_with, "dtype": dtype_name(self.dt),
                         "autocast": dtype_name(self.amp) if self.amp is not None else None,
                         "val_tokens_per_language": {k: int(v.numel()) for k, v in self.packed.items()},
                         "parallel_pairs": len(pairs[0]) if pairs else 0, "validation_text": validation_text}
        self.base = snapshot_weights(self.model)
        self._before: Optional[Dict[str, Any]] = None

    def _measure(self, tag: str) -> Dict[str, Any]:
        import sys
        from .. import api

        from ..training.loss import install_chunked_loss

        api.patch(self.model)  # fused MLP + chunked loss: the same forward for every state
        install_chunked_loss(self.model, chunk_size=eval_loss_chunk(self.model))
        for p in self.model.parameters():
            p.requires_grad_(False)
        t0 = now()
        try:
            with amp_ctx(self.dev, self.amp):
                ppl = language_perplexities(self.model, self.packed, self.batch_size, self.dev, desc=f"ppl {tag}")
                align = (alignment(self.model, self.tokenizer, self.pairs[0], self.pairs[1], self.dev)
                         if self.pairs else None)
        finally:
            api.unpatch(self.model)
        if not self.quiet:
            print(f"  {tag}: {self.target} ppl {ppl[self.target]:.3f} ({now() - t0:.0f}s)", file=sys.stderr, flush=True)
        return {"ppl": ppl, "alignment": align, "seconds": now() - t0}

    def _restore(self) -> None:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(self.base[name].to(p.device, p.dtype))

    def before(self) -> Dict[str, Any]:
        if self._before is None:
            self._restore()
            self._before = {**self._measure("before"), "settings": self.settings}
        return self._before

    def after(self, run_dir: str, allow_other_model: bool = False) -> Dict[str, Any]:
        """The EVAL.json content for one run (``before`` included). A run trained on another model
        (another fingerprint) is refused naming both, unless ``allow_other_model``."""
        info = load_run_info(Path(run_dir))
        if info.get("language") != self.target:
            raise ExperimentError(f"--run {run_dir} trained {info.get('language')!r}, but --target is {self.target!r}")
        self._restore()
        check_same_model(info.get("model_fingerprint"), info.get("model"), self.model, f"run {run_dir}",
                         allow_other_model=allow_other_model)
        before = self.before()
        self._restore()
        self.model = apply_run(self.model, Path(run_dir), info, allow_other_model=allow_other_model)
        norms = update_norms(self.base, self.model)
        after = self._measure(f"after {info['method']}")
        self._restore()
        target, languages = self.target, self.languages
        change = {lang: after["ppl"][lang] / before["ppl"][lang] - 1.0 for lang in languages}
        others = [lang for lang in languages if lang != target]
        return {
            "format": EVAL_FORMAT,
            "settings": self.settings,
            "before": before,
            "run": {k: info.get(k) for k in ("method", "language", "model", "steps", "tokens_trained",
                                             "trainable_params", "total_params", "trainable_fraction",
                                             "peak_memory_bytes", "peak_memory_kind", "mean_step_time_s",
                                             "tokens_per_s", "best", "neuron_count", "lr", "config_hash", "inputs")},
            "run_dir": str(run_dir),
            "after": after,
            "ppl_change": change,
            "target_ppl_change": change[target],
            "other_ppl_change_mean": (sum(change[o] for o in others) / len(others)) if others else None,
            "other_ppl_abs_change_mean": (sum(abs(change[o]) for o in others) / len(others)) if others else None,
            "update_norms": norms,
        }


def evaluate(model_spec: str, data: Optional[str], languages: Sequence[str], target: str,
             run_dir: Optional[str] = None, allow_other_model: bool = False, **kwargs: Any) -> Dict[str, Any]:
    """Before (and, with ``run_dir``, after) perplexities, alignment and update norms: the
    EVAL.json content. ``kwargs``: the ``Evaluator`` settings."""
    if run_dir is not None:
        info = load_run_info(Path(run_dir))  # fail fast, before loading anything
        if info.get("language") != target:
            raise ExperimentError(f"--run {run_dir} trained {info.get('language')!r}, but --target is {target!r}")
    ev = Evaluator(model_spec, data, languages, target, **kwargs)
    if run_dir is None:
        return {"format": EVAL_FORMAT, "settings": ev.settings, "before": ev.before()}
    return ev.after(run_dir, allow_other_model=allow_other_model)


def evaluate_config(cfg: EvalConfig) -> Dict[str, Any]:
    """``lape-kernels eval``: ``evaluate`` with the settings of an ``EvalConfig``, written to
    ``cfg.out``, which is held for the whole command and checked before anything loads (an
    existing file is replaced only with ``--overwrite``)."""
    with claim_output(cfg.out, inputs=[cfg.model, cfg.data, cfg.run], overwrite=cfg.overwrite, is_dir=False,
                      command="eval"):
        result = evaluate(cfg.model, cfg.data, cfg.languages, cfg.target, cfg.run,
                          allow_other_model=cfg.allow_other_model, **cfg.evaluator_settings())
        write_eval(result, cfg.out)
    return result


def write_eval(result: Dict[str, Any], path: str) -> Path:
    return write_json_atomic(path, result)
