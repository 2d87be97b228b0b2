"""Chunked causal-LM loss: LM head + cross-entropy without the full ``[tokens, vocab]`` logits.

HF's ``ForCausalLM.forward`` materialises the logits (``tokens x vocab``, 262k columns for
Gemma), upcasts them to float32 and keeps them (plus softmax) for backward: at long sequence
lengths that is the largest tensor of a sparse fine-tuning step. Like Liger-Kernel's fused
linear cross-entropy, we compute the loss chunk by chunk over tokens and produce
``d(hidden)`` (and ``d(lm_head.weight)`` when it is trainable) in the same pass, so at most one
chunk of logits exists at a time. Per instance: ``install_chunked_loss`` sets an instance
``forward`` on the CausalLM module (``del`` restores the class's).
"""
from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..patching import add_cleanup, drop_cleanup
from ._autograd import per_device_function

_CLEANUP = "chunked_loss"

__all__ = [
    "install_chunked_loss",
    "uninstall_chunked_loss",
    "has_chunked_loss",
    "chunked_causal_lm_loss",
    "default_chunk_size",
]

#: target number of logits per chunk: fp32 16 MiB on CPU, 128 MiB on GPUs (bigger matmuls,
#: fewer launches; still a small fraction of the full logits at long sequence lengths)
_CHUNK_ELEMENTS = {"cpu": 1 << 22}
_CHUNK_ELEMENTS_ACCEL = 1 << 25
#: but never fewer tokens per chunk than this: every chunk re-reads the whole LM head, and below
#: ~64 rows the head GEMM is memory-bound (Gemma's 262k x 640 head on CPU: the loss of 512 tokens
#: takes 5.5 s in chunks of 16, 2.8 s in chunks of 64)
_MIN_CHUNK_TOKENS = 64


def default_chunk_size(num_tokens: int, vocab: int, device_type: str = "cpu") -> int:
    """Tokens per chunk: a power of two such that a chunk holds about 4M logits (32M on GPUs),
    at least 64 tokens, at most ``num_tokens``."""
    budget = _CHUNK_ELEMENTS.get(device_type, _CHUNK_ELEMENTS_ACCEL)
    c = max(_MIN_CHUNK_TOKENS, budget // max(vocab, 1))
    c = 1 << (c.bit_length() - 1)
    return max(1, min(c, max(num_tokens, 1)))


def _chunked_loss_forward(ctx, hidden, weight, bias, targets, scale, softcap, chunk_size, ignore_index, grad_enabled):
    """sum over valid tokens of CE(lm_head(hidden)), times ``scale``; gradients computed in
    the forward pass, chunk by chunk, and only scaled in backward."""
    N = hidden.shape[0]
    # needs_input_grad is True under no_grad too: an evaluation must not pay for gradients
    need_h, need_w, need_b = (grad_enabled and ctx.needs_input_grad[i] for i in range(3))
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
    any_grad = need_h or need_w or need_b
    for s in range(0, N, chunk_size):
        h = hidden[s : s + chunk_size]
        t = targets[s : s + chunk_size]
        logits = F.linear(h, weight, bias)
        capped = None
        if softcap is not None:
            # same op order and dtype as the HF models (Gemma 2 / 3)
            logits = torch.tanh(logits / softcap)
            capped = logits
            logits = logits * softcap
        ldt = logits.dtype
        lf = logits.float()  # the same tensor when logits are fp32
        del logits
        valid = t != ignore_index
        tt = torch.where(valid, t, torch.zeros_like(t)).unsqueeze(1)
        # logsumexp by hand, in place: no second [chunk, vocab] buffer
        m = lf.amax(dim=1, keepdim=True)
        picked = lf.gather(1, tt)
        e = lf.sub_(m).exp_()
        z = e.sum(dim=1, keepdim=True)
        lse = z.log() + m
        total = total + torch.where(valid, (lse - picked).squeeze(1), torch.zeros_like(t, dtype=lse.dtype)).sum()
        if not any_grad:
            continue
        # d loss / d logits = (softmax - onehot) * scale on valid rows
        p = e.div_(z)
        vf = valid.to(p.dtype).unsqueeze(1)
        p.scatter_add_(1, tt, -vf)
        p.mul_(vf * scale)
        dl = p.to(ldt)
        del p, e, lf
        if softcap is not None:  # tanh backward, in HF's op order and dtype
            dl = dl.mul_(softcap).mul_(1 - capped * capped).div_(softcap)
        if need_h:
            grad_h[s : s + chunk_size] = torch.matmul(dl, weight).to(hidden.dtype)
        if need_w:
            grad_w += torch.matmul(dl.t(), h).float()
        if need_b:
            grad_b += dl.float().sum(0)
    loss = total * scale
    ctx.save_for_backward(
        grad_h if need_h else None,
        grad_w.to(weight.dtype) if need_w else None,
        grad_b.to(bias.dtype) if need_b else None,
    )
    return loss


def _chunked_loss_backward(ctx, dloss):
    grad_h, grad_w, grad_b = ctx.saved_tensors
    scale = dloss.to(torch.float32)
    gh = (grad_h * scale).to(grad_h.dtype) if grad_h is not None else None
    gw = (grad_w * scale).to(grad_w.dtype) if grad_w is not None else None
    gb = (grad_b * scale).to(grad_b.dtype) if grad_b is not None else None
    return gh, gw, gb, None, None, None, None, None, None


#: the chunked loss's autograd.Function for a device type (``ChunkedLMLoss_cpu``, ...)
_function_for = per_device_function("ChunkedLMLoss", _chunked_loss_forward, _chunked_loss_backward)


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    lm_head: nn.Linear,
    labels: Optional[torch.Tensor],
    *,
    num_items_in_batch: Any = None,
    ignore_index: int = -100,
    shift_labels: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """HF's ``ForCausalLMLoss(lm_head(hidden), labels)`` (same shift, ``ignore_index``, mean over
    non-ignored tokens or sum / ``num_items_in_batch``) computed chunk by chunk."""
    H = hidden.shape[-1]
    if shift_labels is None:
        if labels is None:
            raise ValueError("chunked_causal_lm_loss needs labels or shift_labels")
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match the hidden states' {tuple(hidden.shape[:-1])}"
            )
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    h2 = hidden.reshape(-1, H)
    if targets.shape[0] != h2.shape[0]:
        raise ValueError(f"{targets.shape[0]} labels for {h2.shape[0]} token positions")
    if targets.dtype != torch.int64:
        targets = targets.long()
    if num_items_in_batch is None:
        denom = (targets != ignore_index).sum().to(torch.float32)
    elif torch.is_tensor(num_items_in_batch):
        denom = num_items_in_batch.to(device=hidden.device, dtype=torch.float32)
    else:
        denom = torch.tensor(float(num_items_in_batch), dtype=torch.float32, device=hidden.device)
    scale = 1.0 / denom
    V = lm_head.weight.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(h2.shape[0], V, hidden.device.type)
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    fn = _function_for(hidden.device.type)
    return fn.apply(h2, lm_head.weight, lm_head.bias, targets, scale, softcap, int(chunk_size), ignore_index,
                    torch.is_grad_enabled())


# ----------------------------------------------------------------------------- per-instance forward


def _slice_logits_to_keep(hidden: torch.Tensor, logits_to_keep: Any) -> torch.Tensor:
    try:
        from transformers.modeling_utils import slice_logits_to_keep

        return slice_logits_to_keep(hidden, logits_to_keep)
    except ImportError:  # older transformers
        if isinstance(logits_to_keep, int):
            logits_to_keep = slice(-logits_to_keep, None)
        return hidden[:, logits_to_keep, :]


def _chunked_forward(self: nn.Module, *args: Any, **kwargs: Any):
    """The CausalLM forward with the loss computed by ``chunked_causal_lm_loss`` (logits=None)."""
    cls_forward = type(self).forward
    if args:
        names = [n for n in inspect.signature(cls_forward).parameters if n != "self"]
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"forward() got multiple values for argument {name!r}")
            kwargs[name] = value
    labels = kwargs.get("labels")
    shift_labels = kwargs.get("shift_labels")
    if labels is None and shift_labels is None:
        return cls_forward(self, **kwargs)
    kwargs.pop("labels", None)
    kwargs.pop("shift_labels", None)
    logits_to_keep = kwargs.pop("logits_to_keep", 0)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    ignore_index = kwargs.pop("ignore_index", -100)
    num_items_in_batch = kwargs.get("num_items_in_batch")
    body = getattr(self, self.base_model_prefix, None) if hasattr(self, "base_model_prefix") else None
    if body is None:
        body = self.model
    outputs = body(**kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    hidden = _slice_logits_to_keep(hidden, logits_to_keep)
    loss = chunked_causal_lm_loss(
        hidden,
        self.lm_head,
        labels,
        num_items_in_batch=num_items_in_batch,
        ignore_index=ignore_index,
        shift_labels=shift_labels,
        softcap=getattr(self.config, "final_logit_softcapping", None),
        chunk_size=getattr(self, "_lape_loss_chunk_size", None),
    )
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = {"loss": loss, "logits": None}
    for name in ("cache", "past_key_values", "hidden_states", "attentions"):
        if name in CausalLMOutputWithPast.__dataclass_fields__ and hasattr(outputs, name):
            fields[name] = getattr(outputs, name)
    out = CausalLMOutputWithPast(**fields)
    return out if return_dict else out.to_tuple()


#: config attributes by which a CausalLM rescales its logits after ``lm_head`` (Cohere multiplies by
#: ``logit_scale``, Granite divides by ``logits_scaling``, RecurrentGemma soft-caps by ``logits_soft_cap``);
#: the chunked loss computes CE of
#: ``lm_head(hidden)``, so such models keep their own loss
_LOGIT_RESCALING = ("logit_scale", "logits_scaling", "logits_soft_cap")


def _applies(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    rescaled = any(getattr(config, a, None) not in (None, 1, 1.0) for a in _LOGIT_RESCALING)
    return (
        isinstance(getattr(model, "lm_head", None), nn.Linear)
        and type(model).__name__.endswith("ForCausalLM")
        and config is not None
        and not rescaled
    )


def has_chunked_loss(model: nn.Module) -> bool:
    fwd = model.__dict__.get("forward")
    return getattr(fwd, "__func__", None) is not None and getattr(fwd.__func__, "_lape_chunked", False)


def install_chunked_loss(model: nn.Module, chunk_size: Optional[int] = None) -> nn.Module:
    """Make ``model(..., labels=...)`` compute the causal-LM loss chunked (returns ``model``).

    Per instance and idempotent; a no-op for modules that are not ``*ForCausalLM`` with an
    ``lm_head`` (e.g. a bare decoder body). ``chunk_size``: tokens per chunk (default:
    ``default_chunk_size``).
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if not _applies(model):
        return model
    model._lape_loss_chunk_size = chunk_size
    if has_chunked_loss(model):
        return model
    if "forward" in model.__dict__:
        raise RuntimeError(
            f"{type(model).__name__} already has an instance-level forward (another patch?): "
            "refusing to stack the chunked loss on top of it"
        )

    @functools.wraps(type(model).forward)
    def forward(self, *args, **kwargs):
        return _chunked_forward(self, *args, **kwargs)

    forward._lape_chunked = True
    model.forward = types.MethodType(forward, model)
    add_cleanup(model, _CLEANUP, uninstall_chunked_loss)
    return model


def uninstall_chunked_loss(model: nn.Module) -> nn.Module:
    """Restore the class forward (no-op when not installed)."""
    if has_chunked_loss(model):
        del model.forward
    model.__dict__.pop("_lape_loss_chunk_size", None)
    drop_cleanup(model, _CLEANUP)
    return model
