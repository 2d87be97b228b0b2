"""Shared oracles for the tests, the benchmarks and the examples: one copy of each baseline
that lape_kernels is measured against, so a check and a benchmark cannot drift apart.

- Tiny random models of every supported family (``tiny_model``, ``tiny_gemma3_multimodal``),
  a character tokenizer (``tiny_tokenizer``), padded batches (``random_batch``) and random
  neuron selections (``random_neurons``): built offline from transformers config classes.
- The LAPE reference's counting (``HookCounter``, ``hook_counts``, ``lape_count``): forward
  hooks on an unpatched model's activation modules, what ``record`` must equal.
- The paper's slice training (``slice_training``): every forward clones each MLP weight with
  the trainable slices scattered in and runs dense autograd, what sparse training must equal.
- Mixture-of-experts oracles (``testing/experts.py``, re-exported here): per-expert counts
  (``expert_hook_counts``), expert neuron selections, slice training through the stacked expert
  weights, and the LAPE reference selection (``lape_reference_select``).

Nothing here is used by the library itself.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..api import unpatch
from ..introspection import decoder_layers, discover, expert_weights, family_for, mlp_modules, mlp_shape
from ..patching import is_patched
from .experts import (expert_hook_counts, lape_reference_select, live_expert_neurons, random_expert_neurons,
                      slice_training_experts)

__all__ = [
    "TINY_FAMILIES",
    "TINY_MOE_FAMILIES",
    "expert_hook_counts",
    "random_expert_neurons",
    "live_expert_neurons",
    "lape_reference_select",
    "TINY_HIDDEN",
    "TINY_VOCAB",
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
    "tiny_config",
    "tiny_model",
    "tiny_gemma3_multimodal",
    "tiny_tokenizer",
    "random_batch",
    "random_neurons",
    "activation_modules",
    "lape_count",
    "HookCounter",
    "hook_counts",
    "slice_training",
    "bake_slice_training",
]

# ----------------------------------------------------------------------------- tiny models

#: every supported dense family, by the transformers ``model_type`` of its causal LM
TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
#: the mixture-of-experts families (4 experts of intermediate 32, top-2; Qwen2-MoE adds a shared
#: expert of intermediate 48 in every layer)
TINY_MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
TINY_HIDDEN = 64
TINY_VOCAB = 256
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

_TINY_FAMILY_CONFIG = {
    "mistral": dict(sliding_window=None),
    "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16),
    # a window shorter than the test sequences, so that sliding-window attention is exercised
    "gemma2": dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16),
    "gemma3_text": dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16),
    "mixtral": dict(sliding_window=None, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=48, norm_topk_prob=True),
    "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
}
#: the config field holding the experts' intermediate size
_EXPERT_INTERMEDIATE = {"mixtral": "intermediate_size", "olmoe": "intermediate_size",
                        "qwen2_moe": "moe_intermediate_size", "qwen3_moe": "moe_intermediate_size"}


def tiny_config(family: str, num_layers: int = 3, intermediate: Optional[int] = None, **overrides):
    """The transformers config of a tiny ``family`` model: hidden 64, 4 heads (2 KV), vocab 256,
    256 positions, pad/bos/eos token ids 0/1/2, eager attention; ``intermediate`` defaults to
    128 (96 for Phi-3, whose fused gate_up output is then 192 wide). ``overrides`` are config
    fields."""
    from transformers import AutoConfig

    if family not in TINY_FAMILIES + TINY_MOE_FAMILIES:
        raise ValueError(f"family must be one of {TINY_FAMILIES + TINY_MOE_FAMILIES}, got {family!r}")
    if intermediate is None:
        intermediate = 96 if family == "phi3" else 32 if family in TINY_MOE_FAMILIES else 128
    fields = dict(
        vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, intermediate_size=intermediate, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )
    fields.update(_TINY_FAMILY_CONFIG.get(family, {}))
    if family in _EXPERT_INTERMEDIATE:
        fields[_EXPERT_INTERMEDIATE[family]] = intermediate
    fields.update(overrides)
    config = AutoConfig.for_model(family, **fields)
    config._attn_implementation = "eager"
    return config


@torch.no_grad()
def _vary_signs(model: nn.Module, seed: int) -> None:
    """O(1) activations, and neurons of varied sign statistics.

    Every embedding shares a common direction ``m``; a third of the gate rows lean towards
    ``m`` (mostly positive), a third away from it (mostly negative), the rest are unbiased
    (strongly mixed in sign), so activation probabilities span (0, 1) as in real models.
    """
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(TINY_HIDDEN, generator=g)
    m = m / m.norm()
    tied = {id(p) for m_ in model.modules() if isinstance(m_, nn.Embedding) for p in m_.parameters()}
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) in tied:
            continue  # tied LM head (Gemma): keep the embedding's init
        if isinstance(module, nn.Embedding):
            module.weight.copy_(torch.randn(module.weight.shape, generator=g) + 6.0 * m)
        elif isinstance(module, nn.Linear):
            fan_in = module.weight.shape[1]
            module.weight.copy_(torch.randn(module.weight.shape, generator=g) / fan_in**0.5)
            if module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
    def lean_rows(gate_w: torch.Tensor) -> None:
        n = gate_w.shape[0]
        lean = torch.zeros(n)
        lean[: n // 3] = 1.5
        lean[n // 3 : 2 * n // 3] = -1.5
        lean = lean[torch.randperm(n, generator=g)]
        gate_w.add_(lean[:, None] * m[None, :])

    found = discover(model, probe=False)
    for mlp in found.mlps:
        lean_rows(mlp.family.weights(mlp.module)[0])
    for x in found.experts:  # stacked expert weights and the routers (not nn.Linear)
        x.module.gate_up_proj.copy_(torch.randn(x.module.gate_up_proj.shape, generator=g) / TINY_HIDDEN**0.5)
        x.module.down_proj.copy_(torch.randn(x.module.down_proj.shape, generator=g) / x.intermediate_size**0.5)
        for e in range(x.num_experts):
            lean_rows(expert_weights(x.module, e)[0])
    for name, p in model.named_parameters():
        if name.endswith("gate.weight") and p.dim() == 2 and p.shape[1] == TINY_HIDDEN:  # MoE routers
            p.copy_(torch.randn(p.shape, generator=g))


def tiny_model(
    family: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    num_layers: int = 3,
    intermediate: Optional[int] = None,
    *,
    varied_signs: bool = True,
    experts_implementation: str = "grouped_mm",
    **overrides,
) -> nn.Module:
    """A random-init causal LM of ``family`` (see ``tiny_config``), in eval mode.

    ``varied_signs``: re-initialise the weights so that activations are O(1) and activation
    probabilities span (0, 1) as in trained models (what counting and identification need);
    False keeps transformers' own init (next-token distributions near uniform).
    ``experts_implementation``: how a MoE family runs its experts (transformers' setting). The same
    arguments give the same weights; the global RNG state is left as it was.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, num_layers, intermediate, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    if varied_signs:
        _vary_signs(model, seed)
    if family in TINY_MOE_FAMILIES:
        model.set_experts_implementation(experts_implementation)
    return model.to(dtype).eval()


def tiny_gemma3_multimodal(seed: int = 0) -> nn.Module:
    """A tiny Gemma3ForConditionalGeneration: a vision tower whose encoder ``layers`` (plain
    MLPs) come before the language model's, and a wrapper that hands the language model a dict
    of 4-D masks instead of the 2-D attention mask."""
    import transformers as tf

    tc = tf.Gemma3TextConfig(vocab_size=TINY_VOCAB + 4, hidden_size=TINY_HIDDEN, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             pad_token_id=PAD_ID)
    vc = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14)
    cfg = tf.Gemma3Config(text_config=tc.to_dict(), vision_config=vc.to_dict(), mm_tokens_per_image=4,
                          image_token_index=TINY_VOCAB + 3, boi_token_index=TINY_VOCAB + 1,
                          eoi_token_index=TINY_VOCAB + 2)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return tf.Gemma3ForConditionalGeneration(cfg).eval()


def tiny_tokenizer(vocab_size: int = TINY_VOCAB):
    """Character-level fast tokenizer (no files): <pad>=0, <s>=1, </s>=2, <unk>=3, then
    printable ASCII; prepends <s>. Unknown characters map to <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    if vocab_size < len(specials) + len(chars):
        raise ValueError(f"vocab_size must be >= {len(specials) + len(chars)}, got {vocab_size}")
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def random_batch(
    batch: int = 3,
    seq: int = 10,
    seed: int = 0,
    padding: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for the tiny models; with ``padding`` 'left'/'right' rows have
    varied lengths (row 0 full, others shorter; pad positions hold PAD_ID)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY_VOCAB, (batch, seq), generator=g)
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


def random_neurons(num_layers: int, intermediate: int, k: Union[int, Sequence[int]], seed: int = 0) -> List[torch.Tensor]:
    """Per layer, ``k`` (or ``k[layer]``) distinct neurons drawn uniformly from one seeded CPU
    generator, as sorted int64 tensors."""
    counts = [k] * num_layers if isinstance(k, int) else list(k)
    if len(counts) != num_layers:
        raise ValueError(f"k lists {len(counts)} layers, expected {num_layers}")
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(intermediate, generator=g)[:n].sort().values for n in counts]


# ----------------------------------------------------------------------------- LAPE hook counting


def activation_modules(model: nn.Module) -> List[nn.Module]:
    """Each decoder layer's activation module (Phi-3: ``activation_fn``, others ``act_fn``):
    where the LAPE reference hooks."""
    mods = [m.activation_module for m in discover(model, probe=False).mlps]  # also a MoE layer's shared expert
    if len({id(m) for m in mods}) != len(mods):
        raise ValueError("activation modules are shared between layers: per-layer hooks would be ambiguous")
    return mods


def lape_count(act: torch.Tensor, token_lang: Optional[torch.Tensor] = None, num_langs: int = 1,
               with_sum: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The LAPE reference's statistics of one activation tensor ``act`` ``[..., I]``:
    ``over_zero[k]`` = how many of language k's tokens have ``act.float() > 0``, int64
    ``[num_langs, I]``; ``act_sum[k]`` their float64 sum (None unless ``with_sum``).
    ``token_lang``: language id per token (``act.shape[:-1]`` flattened; -1 = skip); None =
    every token is language 0."""
    a = act.reshape(-1, act.shape[-1]).float()
    if token_lang is None:
        rows = [a] + [a[:0]] * (num_langs - 1)
    else:
        flat = token_lang.reshape(-1).to(a.device)
        rows = [a[flat == k] for k in range(num_langs)]
    over_zero = torch.stack([(r > 0).sum(0) for r in rows])
    act_sum = torch.stack([r.double().sum(0) for r in rows]) if with_sum else None
    return over_zero, act_sum


class HookCounter:
    """LAPE statistics the way the LAPE reference gets them: a forward hook on every layer's
    activation module of an unpatched model adds :func:`lape_count` of its output.

    ``over_zero`` int64 ``[num_langs, L, I]``, ``act_sum`` float64 (None unless ``with_sum``),
    ``n_tokens`` int64 ``[num_langs]``, accumulated over forwards on the model's device.
    ``token_lang`` (``[B, S]`` language ids, -1 = skip; None = all language 0) says which
    language the next forward's tokens belong to. A context manager: the hooks go on exit.
    """

    def __init__(self, model: nn.Module, num_langs: int = 1, with_sum: bool = True) -> None:
        mods = activation_modules(model)
        shape = mlp_shape(model)
        device = next(model.parameters()).device
        self.num_langs, self.with_sum = num_langs, with_sum
        self.over_zero = torch.zeros(num_langs, shape.num_layers, shape.intermediate_size, dtype=torch.int64,
                                     device=device)
        self.act_sum = torch.zeros(self.over_zero.shape, dtype=torch.float64, device=device) if with_sum else None
        self.n_tokens = torch.zeros(num_langs, dtype=torch.int64, device=device)
        self.token_lang: Optional[torch.Tensor] = None
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(mods)]

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            over_zero, act_sum = lape_count(output, self.token_lang, self.num_langs, self.with_sum)
            self.over_zero[:, layer] += over_zero
            if act_sum is not None:
                self.act_sum[:, layer] += act_sum
            if layer == 0:
                if self.token_lang is None:
                    self.n_tokens[0] += output.reshape(-1, output.shape[-1]).shape[0]
                else:
                    lang = self.token_lang.reshape(-1).to(self.n_tokens.device)
                    self.n_tokens += torch.stack([(lang == k).sum() for k in range(self.num_langs)])

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> "HookCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def hook_counts(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    token_lang: Optional[torch.Tensor] = None,
    num_langs: int = 1,
) -> Dict[str, torch.Tensor]:
    """One forward's :class:`HookCounter` statistics on an UNPATCHED copy of ``model``, padding
    (``attention_mask == 0``) excluded. ``token_lang``: ``[B]`` or ``[B, S]`` language ids
    (-1 = skip); None = every token is language 0. The copy runs Hugging Face's own MLP in the
    model's dtype: the patched ops compute exactly that, so counts compare bit for bit.
    Returns ``over_zero`` int64 [num_langs, L, I], ``act_sum`` float64 [num_langs, L, I],
    ``n_tokens`` int64 [num_langs], on the CPU.
    """
    ref = copy.deepcopy(model)
    if is_patched(ref):
        unpatch(ref)
    B, S = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, S, dtype=torch.int64, device=input_ids.device)
    if token_lang is None:
        lang = torch.zeros(B, S, dtype=torch.int64, device=input_ids.device)
    else:
        lang = token_lang.to(input_ids.device)
        lang = lang[:, None].expand(B, S) if lang.dim() == 1 else lang
    lang = torch.where(attention_mask.bool(), lang, torch.full_like(lang, -1))
    with HookCounter(ref, num_langs) as counter:
        counter.token_lang = lang
        ref(input_ids=input_ids, attention_mask=attention_mask)
    return {"over_zero": counter.over_zero.cpu(), "act_sum": counter.act_sum.cpu(), "n_tokens": counter.n_tokens.cpu()}


# ----------------------------------------------------------------------------- slice training


class _ScatterSlices(nn.Module):
    """Parametrization ``W -> W.index_copy(dim, index, cat(slices))``: the slices are the
    trainable parameters; autograd runs through the full (cloned) weight."""

    def __init__(self, dim: int, index: torch.Tensor, slices: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("index", index)
        self.slices = nn.ParameterList([nn.Parameter(s) for s in slices])

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        src = self.slices[0] if len(self.slices) == 1 else torch.cat(list(self.slices), dim=self.dim)
        return w.index_copy(self.dim, self.index, src)


def adamw_steps(model: nn.Module, params: Sequence[nn.Parameter], input_ids: torch.Tensor,
                labels: torch.Tensor, steps: int = 3, lr: float = 1e-2) -> List[float]:
    """The paper's optimisation (AdamW with weight decay 0.01, gradients clipped to norm 1) for
    `steps` steps on one batch: what both sides of a training-parity check run. Returns the losses."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def slice_training(model: nn.Module, neurons: Optional[Sequence[torch.Tensor]],
                   expert_neurons: Optional[Sequence[Sequence[torch.Tensor]]] = None) -> List[nn.Parameter]:
    """The paper's slice training, installed in place on an UNPATCHED model: every parameter is
    frozen, and each selected neuron's gate row, up row and down column become trainable
    slices written into a clone of the full weight on every forward (a parametrization), with
    dense autograd through it (dense weight-shaped gradients, as the paper's implementation).
    ``expert_neurons`` (per MoE layer, per expert, sorted indices) does the same for routed
    experts: their stacked weights are cloned and spliced, and the model's own experts
    implementation runs on them.

    Returns the slices in the order of ``lape_kernels.trainable_parameters`` (gate rows, up
    rows, down columns, layer by layer; layers without neurons have none; then the same per MoE
    layer over its selected (expert, neuron) pairs, expert-major)."""
    from torch.nn.utils import parametrize

    if is_patched(model):
        raise ValueError("slice_training is the unpatched baseline: unpatch the model first")
    for p in model.parameters():
        p.requires_grad_(False)
    params: List[nn.Parameter] = []
    experts = discover(model, probe=False).experts if expert_neurons is not None else ()
    if neurons is not None:
        _slice_training_mlps(model, neurons, params)
    if expert_neurons is not None:
        slice_training_experts(experts, expert_neurons, params)
    return params


def _slice_training_mlps(model: nn.Module, neurons: Sequence[torch.Tensor], params: List[nn.Parameter]) -> None:
    from torch.nn.utils import parametrize

    family = family_for(model)

    def scatter(linear: nn.Linear, dim: int, index: torch.Tensor, slices: List[torch.Tensor]) -> None:
        mod = _ScatterSlices(dim, index, [s.detach().clone() for s in slices])
        parametrize.register_parametrization(linear, "weight", mod, unsafe=True)
        params.extend(mod.slices)

    for mlp, sel in zip(mlp_modules(model), neurons):
        if sel.numel() == 0:
            continue
        wg, wu, wd = family.weights(mlp)
        sel = sel.to(wd.device)
        if family.fused_gate_up:  # the gate and up rows of the neurons, in the proven layout
            rows = torch.cat(family.gate_rows(wg.shape[0], sel))
            scatter(getattr(mlp, family.gate_up_name), 0, rows, [wg[sel], wu[sel]])
        else:
            scatter(getattr(mlp, family.gate_name), 0, sel, [wg[sel]])
            scatter(getattr(mlp, family.up_name), 0, sel, [wu[sel]])
        scatter(getattr(mlp, family.down_name), 1, sel, [wd[:, sel]])


def bake_slice_training(model: nn.Module) -> nn.Module:
    """Write the trained slices into the weights and remove the parametrizations."""
    from torch.nn.utils import parametrize

    for module in list(model.modules()):
        for name in ("weight", "gate_up_proj", "down_proj"):
            if parametrize.is_parametrized(module, name):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model
