"""Evaluation of a fine-tuning run: what it bought (target-language perplexity), what it cost
(other languages' perplexity), how it moved the representations (cross-lingual alignment with
English) and where it changed the weights (per-layer relative update norms).

Every measure is taken on the base model ("before") and on the base model with the run's best
checkpoint merged in ("after"), with the same packed validation text.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .common import (
    ExperimentError,
    autocast as amp_ctx,
    corpus_texts,
    eval_loss_chunk,
    dtype_name,
    load_corpus,
    load_model,
    now,
    one_line,
    pack,
    parse_device,
    parallel_pairs,
    parse_autocast,
    parse_dtype,
    progress,
    read_json,
    write_json_atomic,
)

__all__ = [
    "EVAL_FORMAT",
    "mean_nll",
    "pack_validation",
    "language_perplexities",
    "alignment",
    "apply_run",
    "snapshot_weights",
    "update_norms",
    "evaluate",
    "Evaluator",
    "write_eval",
]

EVAL_FORMAT = "lape_kernels.eval"


@torch.no_grad()
def mean_nll(model: nn.Module, ids: torch.Tensor, batch_size: int, device: torch.device,
             bar: Any = None) -> Tuple[float, int]:
    """(summed next-token NLL, number of predicted tokens) over packed sequences ``ids`` [N, S].

    Packed sequences have no padding, so every position after the first is a real target and
    the model's mean loss times ``B * (S - 1)`` is the exact sum.
    """
    total = 0.0
    count = 0
    for start in range(0, ids.shape[0], batch_size):
        x = ids[start:start + batch_size].to(device)
        loss = model(input_ids=x, labels=x).loss
        n = x.shape[0] * (x.shape[1] - 1)
        total += float(loss.double()) * n
        count += n
        if bar is not None:
            bar.update(x.numel())
    return total, count


def pack_validation(tokenizer: Any, corpus: Mapping[str, Any], languages: Sequence[str], seq_len: int,
                    val_tokens: int) -> Dict[str, torch.Tensor]:
    """The first ``val_tokens`` tokens of each language's validation split, packed."""
    return {lang: pack(tokenizer, corpus_texts(corpus, lang, "validation"), seq_len, max_tokens=val_tokens,
                       what=f"language {lang!r} validation split")
            for lang in languages}


def language_perplexities(model: nn.Module, packed: Mapping[str, torch.Tensor], batch_size: int,
                          device: torch.device, desc: str = "ppl") -> Dict[str, float]:
    total = sum(int(v.numel()) for v in packed.values())
    bar = progress(total, desc)
    out = {}
    try:
        for lang, ids in packed.items():
            nll, n = mean_nll(model, ids, batch_size, device, bar)
            out[lang] = math.exp(nll / n)
    finally:
        bar.close()
    return out


@torch.no_grad()
def _pooled_states(model: nn.Module, tokenizer: Any, sentences: Sequence[str], device: torch.device,
                   batch_size: int) -> torch.Tensor:
    """float32 ``[num_layers + 1, n, H]``: per layer, the mean hidden state over each sentence's
    real tokens (padding and special tokens such as BOS excluded: BOS is an attention sink whose
    huge state would make every sentence look alike)."""
    from .. import introspection

    body = introspection.decoder_body(model)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    chunks = []
    for start in range(0, len(sentences), batch_size):
        batch = list(sentences[start:start + batch_size])
        enc = [tokenizer(s, add_special_tokens=True, return_special_tokens_mask=True) for s in batch]
        width = max(len(e["input_ids"]) for e in enc)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        real = torch.zeros((len(batch), width), dtype=torch.bool)
        for i, e in enumerate(enc):  # right padding
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            mask[i, :n] = 1
            special = torch.tensor(e.get("special_tokens_mask", [0] * n), dtype=torch.bool)
            real[i, :n] = ~special
        real &= mask.bool()
        empty = ~real.any(dim=1)
        real[empty] = mask.bool()[empty]  # a sentence of only special tokens: use them
        out = body(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
        hs = out.hidden_states
        w = real.to(device).unsqueeze(-1).float()
        pooled = torch.stack([(h.float() * w).sum(1) / w.sum(1) for h in hs])  # [L+1, B, H]
        chunks.append(pooled.cpu())
    return torch.cat(chunks, dim=1)


def alignment(model: nn.Module, tokenizer: Any, target_sentences: Sequence[str], english_sentences: Sequence[str],
              device: torch.device, batch_size: int = 8) -> List[float]:
    """Per layer (0 = embeddings), the mean over sentence pairs of the cosine similarity of
    the mean-pooled hidden states of a target sentence and its English translation."""
    a = _pooled_states(model, tokenizer, target_sentences, device, batch_size)
    b = _pooled_states(model, tokenizer, english_sentences, device, batch_size)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)  # [L+1, n]
    return [float(v) for v in cos.mean(dim=1)]


# ----------------------------------------------------------------------------- runs
def load_run_info(run_dir: Path) -> Dict[str, Any]:
    from .finetune import RUN_FORMAT

    run_json = run_dir / "run.json"
    if not run_json.exists():
        raise ExperimentError(f"--run {run_dir}: not a finished run (no run.json; an interrupted run lives in "
                              f".{run_dir.name}.partial until it completes)")
    info = read_json(run_json)
    if info.get("format") != RUN_FORMAT or not info.get("complete"):
        raise ExperimentError(f"--run {run_dir}: run.json is not a complete lape_kernels run")
    return info


def apply_run(model: nn.Module, run_dir: Path, info: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Merge a run's best checkpoint into ``model`` (in place for neurons and weights; LoRA is
    merged and unloaded). Returns the plain (unpatched) model."""
    from .. import api, patching

    info = info or load_run_info(run_dir)
    art = run_dir / info.get("artifact", "best")
    fmt = info.get("artifact_format")
    if not art.exists():
        raise ExperimentError(f"--run {run_dir}: checkpoint {art} is missing")
    if patching.is_patched(model):
        api.unpatch(model)
    try:
        if fmt == "neurons":
            from ..training import load_neurons, merge

            load_neurons(model, art)
            merge(model)
        elif fmt == "lora":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(art)).merge_and_unload()
        elif fmt == "weights":
            from safetensors.torch import load_file

            tensors = load_file(str(art / "weights.safetensors"))
            params = dict(model.named_parameters())
            unknown = sorted(set(tensors) - set(params))
            if unknown:
                raise ExperimentError(f"--run {run_dir}: weights {unknown[:3]} are not in the model (another model?)")
            with torch.no_grad():
                for name, t in tensors.items():
                    p = params[name]
                    if p.shape != t.shape:
                        raise ExperimentError(f"--run {run_dir}: {name} has shape {tuple(t.shape)}, the model "
                                              f"{tuple(p.shape)} (another model?)")
                    p.copy_(t.to(p.device, p.dtype))
        else:
            raise ExperimentError(f"--run {run_dir}: unknown artifact format {fmt!r}")
    except ExperimentError:
        raise
    except (ValueError, RuntimeError, OSError, KeyError) as exc:
        raise ExperimentError(f"--run {run_dir} does not fit the model: {one_line(exc)}") from None
    return model


def snapshot_weights(model: nn.Module) -> Dict[str, torch.Tensor]:
    """CPU float32 copies of every parameter (to measure what a run changed)."""
    return {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in model.named_parameters()}


def update_norms(before: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, Any]:
    """Per decoder layer, ``||W_after - W_before||_F / ||W_before||_F`` over the MLP weights
    (gate, up, down separately and together) and over the rest of the layer; plus every other
    changed parameter (embeddings, final norm). Only what changed is listed outside the MLP."""
    from .. import introspection

    _, layers = introspection.decoder_layers(model)
    layer_prefix = {}
    for name, mod in model.named_modules():
        for i, layer in enumerate(layers):
            if mod is layer:
                layer_prefix[i] = name + "."
    per_layer: List[Dict[str, Any]] = []
    seen = set()
    after = dict(model.named_parameters())
    for i in range(len(layers)):
        pre = layer_prefix[i]
        groups: Dict[str, List[float]] = {}
        for name, p in after.items():
            if not name.startswith(pre):
                continue
            seen.add(name)
            rel = name[len(pre):]
            b = before[name]
            d = (p.detach().to("cpu", torch.float32) - b)
            key = rel.split(".")[1] if rel.startswith("mlp.") else ("attention" if "attn" in rel else "other")
            num, den = groups.setdefault(key, [0.0, 0.0])
            groups[key] = [num + float(d.double().pow(2).sum()), den + float(b.double().pow(2).sum())]
            if rel.startswith("mlp."):
                num, den = groups.setdefault("mlp", [0.0, 0.0])
                groups["mlp"] = [num + float(d.double().pow(2).sum()), den + float(b.double().pow(2).sum())]
        entry = {k: (math.sqrt(v[0]) / math.sqrt(v[1]) if v[1] > 0 else 0.0) for k, v in groups.items()}
        per_layer.append(entry)
    other = {}
    for name, p in after.items():
        if name in seen or name not in before:
            continue
        b = before[name]
        d = p.detach().to("cpu", torch.float32) - b
        num = float(d.double().norm())
        if num > 0:
            other[name] = num / max(float(b.double().norm()), 1e-30)
    return {"per_layer": per_layer, "other": other,
            "mlp_mean": sum(e.get("mlp", 0.0) for e in per_layer) / max(1, len(per_layer))}


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
        for p in self.model.parameters():  # nothing trains here (see common.no_param_grads)
            p.requires_grad_(False)
        self.packed = pack_validation(self.tokenizer, corpus, languages, seq_len, val_tokens)
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
                         "parallel_pairs": len(pairs[0]) if pairs else 0}
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

    def after(self, run_dir: str) -> Dict[str, Any]:
        """The EVAL.json content for one run (``before`` included)."""
        info = load_run_info(Path(run_dir))
        if info.get("language") != self.target:
            raise ExperimentError(f"--run {run_dir} trained {info.get('language')!r}, but --target is {self.target!r}")
        before = self.before()
        self._restore()
        self.model = apply_run(self.model, Path(run_dir), info)
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
                                             "tokens_per_s", "best", "neuron_count", "lr", "config_hash")},
            "run_dir": str(run_dir),
            "after": after,
            "ppl_change": change,
            "target_ppl_change": change[target],
            "other_ppl_change_mean": (sum(change[o] for o in others) / len(others)) if others else None,
            "other_ppl_abs_change_mean": (sum(abs(change[o]) for o in others) / len(others)) if others else None,
            "update_norms": norms,
        }


def evaluate(model_spec: str, data: Optional[str], languages: Sequence[str], target: str,
             run_dir: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
    """Before (and, with ``run_dir``, after) perplexities, alignment and update norms: the
    EVAL.json content. ``kwargs``: the ``Evaluator`` settings."""
    if run_dir is not None:
        info = load_run_info(Path(run_dir))  # fail fast, before loading anything
        if info.get("language") != target:
            raise ExperimentError(f"--run {run_dir} trained {info.get('language')!r}, but --target is {target!r}")
    ev = Evaluator(model_spec, data, languages, target, **kwargs)
    if run_dir is None:
        return {"format": EVAL_FORMAT, "settings": ev.settings, "before": ev.before()}
    return ev.after(run_dir)


def write_eval(result: Dict[str, Any], path: str) -> Path:
    return write_json_atomic(path, result)
