"""What the evaluation measures: next-token NLL and perplexity over packed text, cross-lingual
alignment of hidden states, and where a run changed the weights (relative update norms).

Pure measurements of a model (no files, no runs): training validates with ``mean_nll`` and the
evaluation reports all of them, so both paths compute one number the same way.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
from torch import nn

from .progress import progress

__all__ = ["mean_nll", "language_perplexities", "alignment", "snapshot_weights", "update_norms"]


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
