"""Shared test helpers: tiny random models of every supported family and an independent
hook-based LAPE counter (the LAPE reference's approach) to check ``record`` against."""
from __future__ import annotations

import copy
import types
from typing import Dict, Optional, Tuple

import torch
from torch import nn

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")

HIDDEN = 64
VOCAB = 256
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def _config(family: str, num_layers: int, intermediate: int):
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16)
    if family == "gemma":
        return tf.GemmaConfig(**common, head_dim=16)
    if family == "gemma2":
        return tf.Gemma2Config(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
    if family == "phi3":
        return tf.Phi3Config(**common)
    raise ValueError(f"unknown tiny family {family!r}; known: {FAMILIES}")


def _causal_lm_class(family: str):
    import transformers as tf

    return {
        "llama": tf.LlamaForCausalLM,
        "mistral": tf.MistralForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
        "qwen3": tf.Qwen3ForCausalLM,
        "gemma": tf.GemmaForCausalLM,
        "gemma2": tf.Gemma2ForCausalLM,
        "gemma3_text": tf.Gemma3ForCausalLM,
        "phi3": tf.Phi3ForCausalLM,
    }[family]


@torch.no_grad()
def _init_weights(model: nn.Module, seed: int) -> None:
    """O(1) activations, and neurons of varied sign statistics.

    Every embedding shares a common direction ``m``; a third of the gate rows lean towards
    ``m`` (mostly positive), a third away from it (mostly negative), the rest are unbiased
    (strongly mixed in sign), so activation probabilities span (0, 1) as in real models.
    """
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(HIDDEN, generator=g)
    m = m / m.norm()
    tied = {id(p) for m_ in model.modules() if isinstance(m_, nn.Embedding) for p in m_.parameters()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module.weight) in tied:
            continue  # tied LM head (Gemma): keep the embedding's init
        if isinstance(module, nn.Embedding):
            w = torch.randn(module.weight.shape, generator=g) + 6.0 * m
            module.weight.copy_(w)
        elif isinstance(module, nn.Linear):
            fan_in = module.weight.shape[1]
            w = torch.randn(module.weight.shape, generator=g) / fan_in**0.5
            module.weight.copy_(w)
            if module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
    for layer in model.model.layers:
        mlp = layer.mlp
        gate_w = mlp.gate_up_proj.weight.chunk(2, 0)[0] if hasattr(mlp, "gate_up_proj") else mlp.gate_proj.weight
        n = gate_w.shape[0]
        lean = torch.zeros(n)
        lean[: n // 3] = 1.5
        lean[n // 3 : 2 * n // 3] = -1.5
        lean = lean[torch.randperm(n, generator=g)]
        gate_w.add_(lean[:, None] * m[None, :])


def tiny_model(
    family: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    num_layers: int = 3,
    intermediate: Optional[int] = None,
) -> nn.Module:
    """A random-init causal LM of ``family`` (hidden 64, vocab 256), eval mode, eager attention."""
    if intermediate is None:
        intermediate = 96 if family == "phi3" else 128
    config = _config(family, num_layers, intermediate)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = _causal_lm_class(family)(config)
    _init_weights(model, seed)
    return model.to(dtype).eval()


def random_batch(
    batch: int = 3,
    seq: int = 10,
    seed: int = 0,
    padding: Optional[str] = None,
    device: str = "cpu",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask); with ``padding`` 'left'/'right' rows have varied lengths
    (row 0 full, others shorter; pad positions hold PAD_ID)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    if padding is not None:
        if padding not in ("left", "right"):
            raise ValueError(f"padding must be 'left', 'right' or None, got {padding!r}")
        for b in range(1, batch):
            n_pad = (b * 3) % (seq - 1) + 1
            if padding == "left":
                mask[b, :n_pad] = 0
            else:
                mask[b, seq - n_pad :] = 0
        ids = ids.masked_fill(mask == 0, PAD_ID)
    return ids.to(device), mask.to(device)


def act_modules(model: nn.Module):
    """Each decoder layer's activation module (Phi-3: ``activation_fn``, others ``act_fn``)."""
    mods = []
    for layer in model.model.layers:
        mlp = layer.mlp
        mods.append(mlp.activation_fn if hasattr(mlp, "activation_fn") else mlp.act_fn)
    if len({id(m) for m in mods}) != len(mods):
        raise AssertionError("activation modules are shared between layers: per-layer hooks would be ambiguous")
    return mods


def _round_once_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HF's MLP forward with act(gate) * up in float32 and a single rounding (the ops' contract)."""
    if hasattr(self, "gate_up_proj"):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        act = self.activation_fn(gate.float())
    else:
        gate, up = self.gate_proj(x), self.up_proj(x)
        act = self.act_fn(gate.float())
    return self.down_proj((act * up.float()).to(x.dtype))


@torch.no_grad()
def hook_counts(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    token_lang: Optional[torch.Tensor] = None,
    num_langs: int = 1,
    round_once: Optional[bool] = None,
) -> Dict[str, torch.Tensor]:
    """LAPE statistics the way the LAPE reference gets them, on an UNPATCHED copy of ``model``.

    A forward hook on every layer's activation module takes ``(output.float() > 0)`` and sums it
    over the non-padding tokens of each language. ``token_lang`` is ``[B]`` or ``[B, S]`` of
    language ids (-1 = skip); None = every token is language 0.

    ``round_once`` (default: when the model is not float32): the copy's MLPs evaluate
    act(gate) * up in float32 and round once, as the lape_kernels ops are specified to. Hugging
    Face's bf16 MLP rounds act(gate) to bf16 before the product, so from layer 1 on the gates
    differ in their last bits from those of any round-once implementation and a few near-zero
    gates flip sign: bit-exact count comparisons need the same MLP arithmetic, while the
    counting itself (the hook) stays the reference's.
    Returns ``over_zero`` int64 [num_langs, L, I], ``act_sum`` float64 [num_langs, L, I],
    ``n_tokens`` int64 [num_langs].
    """
    import lape_kernels
    from lape_kernels import patching

    ref = copy.deepcopy(model)
    if patching.is_patched(ref):
        lape_kernels.unpatch(ref)
    if round_once is None:
        round_once = next(ref.parameters()).dtype != torch.float32
    if round_once:
        for layer in ref.model.layers:
            layer.mlp.forward = types.MethodType(_round_once_mlp_forward, layer.mlp)
    B, S = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, S, dtype=torch.int64, device=input_ids.device)
    valid = attention_mask.bool()
    if token_lang is None:
        lang = torch.zeros(B, S, dtype=torch.int64, device=input_ids.device)
    else:
        lang = token_lang.to(input_ids.device)
        lang = lang[:, None].expand(B, S) if lang.dim() == 1 else lang
    lang = torch.where(valid, lang, torch.full_like(lang, -1))
    mods = act_modules(ref)
    L = len(mods)
    over_zero: Dict[int, torch.Tensor] = {}
    act_sum: Dict[int, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(module, args, output):
            a = output.float()
            flat_lang = lang.reshape(-1)
            a2 = a.reshape(flat_lang.shape[0], -1)
            oz = torch.zeros(num_langs, a2.shape[1], dtype=torch.int64)
            sm = torch.zeros(num_langs, a2.shape[1], dtype=torch.float64)
            for k in range(num_langs):
                rows = flat_lang == k
                oz[k] = (a2[rows] > 0).sum(0)
                sm[k] = a2[rows].double().sum(0)
            over_zero[layer] = oz
            act_sum[layer] = sm

        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(mods)]
    try:
        ref(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in handles:
            h.remove()
    n_tokens = torch.stack([(lang == k).sum() for k in range(num_langs)]).to(torch.int64)
    return {
        "over_zero": torch.stack([over_zero[i] for i in range(L)], dim=1),
        "act_sum": torch.stack([act_sum[i] for i in range(L)], dim=1),
        "n_tokens": n_tokens,
    }


def tiny_gemma3_multimodal(seed: int = 0) -> nn.Module:
    """A tiny Gemma3ForConditionalGeneration: a vision tower whose encoder ``layers`` (plain
    MLPs) come before the language model's, and a wrapper that hands the language model a dict
    of 4-D masks instead of the 2-D attention mask."""
    import transformers as tf

    tc = tf.Gemma3TextConfig(vocab_size=VOCAB + 4, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=PAD_ID)
    vc = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14)
    cfg = tf.Gemma3Config(text_config=tc.to_dict(), vision_config=vc.to_dict(), mm_tokens_per_image=4,
                          image_token_index=VOCAB + 3, boi_token_index=VOCAB + 1, eoi_token_index=VOCAB + 2)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return tf.Gemma3ForConditionalGeneration(cfg).eval()
