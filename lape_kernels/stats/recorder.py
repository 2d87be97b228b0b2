"""``record``: collect LAPE statistics from the patched MLP forward of a model.

The recorder is the patched forward's :class:`lape_kernels.patching.Recorder`: every patched MLP
hands it ``act_mul_count``'s per-language counts; patching's hooks on the decoder body tell it
which language each token belongs to (padding from the 2-D attention mask is never counted, nor,
during ``generate()``, the tokens fed to sequences that already ended: ``generation.py``).

Nothing of a block is registered on the model's modules (the hooks belong to the patch), so a
``torch.compile``'d patched model compiles once for all ``record()`` blocks.

``record`` yields :class:`RecordingStats` (or :class:`RecordingStatsByLanguage`): the value types
of ``values.py``, whose numbers follow the recorder's device accumulators while the block runs
and are frozen into plain values when it ends.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import patching
from ..dtypes import dtype_name
from ..fingerprint import model_fingerprint
from ..introspection import expert_shape, mlp_shape, text_config
from ..languages import check_languages
from ..wrappers import unsharded, unwrap
from .generation import GenerateWatch
from .experts import ExpertStats
from .values import ActivationStats, StatsByLanguage

__all__ = ["record", "RecordingStats", "RecordingStatsByLanguage"]

# ------------------------------------------------------------------------------------------------
# Recording
# ------------------------------------------------------------------------------------------------


def _in_backward() -> bool:
    """True while autograd runs a backward pass: gradient checkpointing then re-runs the
    layers' forward, which must not be counted twice."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class _ForwardContext:
    """What one forward of the decoder body means for counting: which language each of its
    B*S tokens belongs to (-1 = padding / skipped), per device."""

    __slots__ = ("num_tokens", "token_lang", "by_device")

    def __init__(self, num_tokens: int, token_lang: Optional[torch.Tensor]) -> None:
        self.num_tokens = num_tokens
        self.token_lang = token_lang
        self.by_device: Dict[torch.device, torch.Tensor] = {}
        if token_lang is not None:
            self.by_device[token_lang.device] = token_lang


class _Recorder:
    """Accumulates ``act_mul_count`` results of every patched MLP (the protocol of
    ``patching._lape_mlp_forward``) and token totals from the decoder body's forward starts."""

    def __init__(self, model: nn.Module, languages: Optional[List[str]]) -> None:
        self.model = model
        self.observed = patching.observed_modules(model)
        self.body = self.observed[-1]
        self.body_position = len(self.observed) - 1
        self.mlps = patching.patched_mlps(model)
        patching.check_no_mlp_adapters(model, "record()", self.mlps)
        sparse = sorted({m._lape.layer_index for m in self.mlps + patching.patched_experts(model)
                         if m._lape.sparse is not None})
        if sparse:
            raise RuntimeError(
                f"record(): layers {sparse} run the sparse-training forward (dense or expert neurons), which does not "
                "count; "
                "merge or unpatch the trained neurons first"
            )
        self.languages = languages
        self.num_langs = len(languages) if languages else 1
        shape = mlp_shape(model)
        self.num_layers, self.intermediate = shape.num_layers, shape.intermediate_size
        # accumulators live where each layer's weights live (multi-device models included);
        # normal (not inference) tensors, so that forwards inside and outside
        # torch.inference_mode() can both add to them
        self.over_zero: List[torch.Tensor] = []
        self.act_sum: List[torch.Tensor] = []
        with torch.inference_mode(False):
            for m in self.mlps:
                dev = patching.weights(m)[0].device
                self.over_zero.append(torch.zeros(self.num_langs, self.intermediate, dtype=torch.int64, device=dev))
                self.act_sum.append(torch.zeros(self.num_langs, self.intermediate, dtype=torch.float64, device=dev))
            self.experts = patching.patched_experts(model)
            self.expert_shape = expert_shape(model) if self.experts else None
            self.ex_over_zero: List[torch.Tensor] = []
            self.ex_act_sum: List[torch.Tensor] = []
            self.ex_routed: List[torch.Tensor] = []
            for x in self.experts:
                dev = x.gate_up_proj.device
                E, I = x._lape.num_experts, x._lape.intermediate_size
                self.ex_over_zero.append(torch.zeros(self.num_langs, E, I, dtype=torch.int64, device=dev))
                self.ex_act_sum.append(torch.zeros(self.num_langs, E, I, dtype=torch.float64, device=dev))
                self.ex_routed.append(torch.zeros(self.num_langs, E, dtype=torch.int64, device=dev))
            # per-language token totals (+ bucket 0 for skipped tokens), on the embeddings' device
            self.n_device = torch.zeros(self.num_langs + 1, dtype=torch.int64, device=self._input_device())
        self.n_host = [0] * self.num_langs  # fast path (no mask, one language): no device op
        self.batch_lang: Optional[torch.Tensor] = None  # CPU int64 [B] or [B, S]
        self._batch_lang_dev: Dict[torch.device, torch.Tensor] = {}
        self.ctx: Optional[_ForwardContext] = None
        self.outer_masks: List[Optional[torch.Tensor]] = []  # 2-D masks of enclosing calls
        self.signatures = [_signature(m) for m in self.observed]
        self.body_sig = self.signatures[-1]
        self.generate_watch = GenerateWatch(model)
        self.fused_gemm = False  # count with gate_up_act_mul_count (see record)

    # -- protocol used by the patched MLP forward ----------------------------------------------
    def token_lang(self, num_tokens: int, device: torch.device) -> Tuple[Optional[torch.Tensor], int]:
        if _in_backward():
            return None, self.num_langs  # recomputation (checkpointing): accumulate ignores it
        ctx = self.ctx
        if ctx is None:
            raise RuntimeError(
                f"record(): a patched MLP ran outside a forward of the decoder body "
                f"({type(self.body).__name__}); tokens are counted per body forward (call the model, not a layer)"
            )
        if num_tokens != ctx.num_tokens:
            raise RuntimeError(
                f"record(): the MLP saw {num_tokens} tokens but the decoder body was called with "
                f"{ctx.num_tokens} (batch x sequence); cannot tell which tokens are padding"
            )
        if ctx.token_lang is None:
            return None, self.num_langs
        tl = ctx.by_device.get(device)
        if tl is None:
            tl = ctx.token_lang.to(device)
            ctx.by_device[device] = tl
        return tl, self.num_langs

    def accumulate(self, layer_index: int, over_zero: torch.Tensor, act_sum: torch.Tensor) -> None:
        if _in_backward():
            return
        acc_oz, acc_sum = self.over_zero[layer_index], self.act_sum[layer_index]
        acc_oz.add_(over_zero.to(acc_oz.device))
        acc_sum.add_(act_sum.to(acc_sum.device))

    def accumulate_experts(self, moe_index: int, over_zero: torch.Tensor, act_sum: torch.Tensor,
                           routed: torch.Tensor) -> None:
        if _in_backward():
            return
        acc = self.ex_over_zero[moe_index]
        acc.add_(over_zero.to(acc.device))
        self.ex_act_sum[moe_index].add_(act_sum.to(acc.device))
        self.ex_routed[moe_index].add_(routed.to(acc.device))

    # -- language assignment -------------------------------------------------------------------
    def set_batch_languages(self, ids: Any) -> None:
        languages = self.languages or []
        names = {l: i for i, l in enumerate(languages)}

        def conv(v: Any) -> int:
            if v is None:
                return -1
            if isinstance(v, str):
                if v not in names:
                    raise ValueError(f"unknown language {v!r}: recording {languages}")
                return names[v]
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"language ids must be ints or language names, got {type(v).__name__}")
            return v

        if isinstance(ids, torch.Tensor):
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise TypeError(f"language ids must be an integer tensor, got {ids.dtype}")
            t = ids.detach().to("cpu", torch.int64)
        elif isinstance(ids, (list, tuple)):
            if ids and isinstance(ids[0], (list, tuple)):
                rows = [[conv(v) for v in row] for row in ids]
                if len({len(r) for r in rows}) > 1:
                    raise ValueError("per-token language ids must form a rectangular [batch, seq] array")
                t = torch.tensor(rows, dtype=torch.int64)
            else:
                t = torch.tensor([conv(v) for v in ids], dtype=torch.int64)
        else:
            raise TypeError(f"language ids must be a tensor or a list, got {type(ids).__name__}")
        if t.dim() not in (1, 2) or t.numel() == 0:
            raise ValueError(
                f"language ids must be [batch] (per sequence) or [batch, seq] (per token), got shape {tuple(t.shape)}"
            )
        bad = t[(t < -1) | (t >= self.num_langs)]
        if bad.numel():
            raise ValueError(
                f"language id {int(bad[0])} out of range: recording {self.num_langs} languages {languages} "
                f"(ids 0..{self.num_langs - 1}, -1 = skip)"
            )
        self.batch_lang = t
        self._batch_lang_dev = {}

    # -- forwards of the decoder body and the modules enclosing it (patching's hooks) ----------
    def enter(self, position: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if _in_backward():
            return
        if position == self.body_position:
            self._body_started(args, kwargs)
        else:
            m = _call_arg(self.signatures[position], args, kwargs, "attention_mask", None)
            self.outer_masks.append(m if isinstance(m, torch.Tensor) and m.dim() == 2 else None)

    def exit(self, position: int, module: nn.Module) -> None:
        if _in_backward():
            return
        if position == self.body_position:
            self.ctx = None
        elif self.outer_masks:
            self.outer_masks.pop()

    def _body_started(self, args: tuple, kwargs: dict) -> None:
        input_ids = _call_arg(self.body_sig, args, kwargs, "input_ids", 0)
        embeds = _call_arg(self.body_sig, args, kwargs, "inputs_embeds", None)
        ref = input_ids if input_ids is not None else embeds
        if not isinstance(ref, torch.Tensor):
            raise RuntimeError("record(): the decoder body was called with neither input_ids nor inputs_embeds")
        if ref.dim() < 2:
            raise ValueError(f"record(): expected input_ids [batch, seq] or inputs_embeds [batch, seq, hidden], got {tuple(ref.shape)}")
        B, S = int(ref.shape[0]), int(ref.shape[1])
        device = ref.device
        mask = _call_arg(self.body_sig, args, kwargs, "attention_mask", 1)
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            # multimodal wrappers (Gemma 3) turn the 2-D mask into a dict of 4-D masks before
            # calling the language model: use the 2-D mask an enclosing module received
            outer = next((m for m in reversed(self.outer_masks) if m is not None), None)
            if outer is not None and outer.shape[0] == B and outer.shape[1] >= S:
                mask = outer
        valid = None
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                what = "a dict of masks" if isinstance(mask, dict) else (
                    f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__)
                raise ValueError(
                    f"record() needs the 2-D [batch, seq] attention_mask to exclude padding, got {what} "
                    "(e.g. generate() with a static cache builds 4-D masks: use the default dynamic cache)"
                )
            if mask.shape[0] != B or mask.shape[1] < S:
                raise ValueError(
                    f"record(): attention_mask of shape {tuple(mask.shape)} does not cover the inputs [batch={B}, seq={S}]"
                )
            valid = mask[:, mask.shape[1] - S :].to(device) != 0  # with a KV cache: the last S columns
        if self.generate_watch.active and isinstance(input_ids, torch.Tensor):
            valid = self.generate_watch.sequence_tokens(input_ids, valid)  # not the pads fed after an EOS
        if self.batch_lang is None:
            if self.num_langs > 1:
                raise RuntimeError(
                    f"recording {self.num_langs} languages {self.languages}: call stats.set_batch_languages(ids) "
                    "before the forward"
                )
            if valid is None:
                self.n_host[0] += B * S
                self.ctx = _ForwardContext(B * S, None)
                return
            lang = torch.where(valid, 0, -1).reshape(-1)
        else:
            lang = self._batch_lang_on(device, B, S, mask.shape[1] if mask is not None else S)
            if valid is not None:
                lang = torch.where(valid, lang, -1)
            lang = lang.reshape(-1)
        lang = lang.to(torch.int64)
        # per-language token totals without a host sync: bucket 0 collects the skipped (-1)
        idx = (lang + 1).to(self.n_device.device)
        self.n_device.index_add_(0, idx, torch.ones_like(idx))
        self.ctx = _ForwardContext(B * S, lang)

    def _batch_lang_on(self, device: torch.device, B: int, S: int, width: int) -> torch.Tensor:
        """The language ids set by ``set_batch_languages`` as [B, S] on ``device``."""
        t = self.batch_lang
        assert t is not None
        if t.shape[0] != B:
            raise ValueError(f"set_batch_languages got {t.shape[0]} sequences but the forward has batch size {B}")
        if t.dim() == 1:
            key: tuple = (device,)
        elif t.shape[1] == S:
            key = (device, S)
        elif t.shape[1] == width and width > S:  # KV-cache step: the ids of the newest S tokens
            key = (device, S, width)
        else:
            raise ValueError(
                f"per-token language ids have {t.shape[1]} columns but the forward has {S} tokens per sequence"
                + (f" (attention mask width {width})" if width != S else "")
                + "; use per-sequence ids [batch] for generation"
            )
        cached = self._batch_lang_dev.get(key)
        if cached is None:
            cached = t.to(device) if t.dim() == 1 else t[:, t.shape[1] - S :].to(device)
            self._batch_lang_dev[key] = cached
        return cached[:, None].expand(B, S) if cached.dim() == 1 else cached

    def _input_device(self) -> torch.device:
        emb = getattr(self.body, "embed_tokens", None)
        for p in (emb.parameters() if isinstance(emb, nn.Module) else self.body.parameters()):
            return p.device
        return torch.device("cpu")

    # -- reading -------------------------------------------------------------------------------
    def snapshot(self, k: int) -> Tuple[torch.Tensor, torch.Tensor, int, Optional[ExpertStats]]:
        """Language ``k``'s totals so far, as new CPU tensors (normal, not inference tensors)."""
        with torch.inference_mode(False):
            if self.mlps:
                over_zero = torch.stack([t[k].to("cpu", copy=True) for t in self.over_zero])
                act_sum = torch.stack([t[k].to("cpu", copy=True) for t in self.act_sum])
            else:  # a mixture-of-experts model without dense MLPs
                over_zero = torch.zeros(0, 0, dtype=torch.int64)
                act_sum = torch.zeros(0, 0, dtype=torch.float64)
            n = self.n_host[k] + int(self.n_device[k + 1].item())
            experts = None
            if self.experts:
                experts = ExpertStats(
                    self.expert_shape.layers,
                    torch.stack([t[k].to("cpu", copy=True) for t in self.ex_over_zero]),
                    torch.stack([t[k].to("cpu", copy=True) for t in self.ex_act_sum]),
                    torch.stack([t[k].to("cpu", copy=True) for t in self.ex_routed]))
        return over_zero, act_sum, n, experts

    def install(self) -> None:
        patching.set_recorder(self.model, self)  # raises when another record() block is active
        self.generate_watch.install()

    def uninstall(self) -> None:
        self.generate_watch.uninstall()
        if self.model.__dict__.get("_lape_model") is not None and self.model._lape_model.recorder is self:
            patching.set_recorder(self.model, None)
        self.ctx = None
        self.outer_masks = []


def _signature(module: nn.Module) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None


def _call_arg(sig: Optional[inspect.Signature], args: tuple, kwargs: dict, name: str, index: Optional[int]) -> Any:
    """Argument ``name`` of a forward call (keyword, or positional by the forward's signature;
    ``index`` when the signature is unknown)."""
    if name in kwargs:
        return kwargs[name]
    if sig is not None:
        params = list(sig.parameters.values())
        for i, p in enumerate(params):
            if p.name == name:
                ok = p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                return args[i] if ok and i < len(args) else None
        return None
    return args[index] if index is not None and index < len(args) else None


class RecordingStats(ActivationStats):
    """One language's statistics of a running ``record`` block: every read of ``over_zero``,
    ``act_sum`` or ``n_tokens`` takes the recorder's current totals (new CPU tensors). When the
    block ends the final values are kept and the object no longer references the model."""

    def __init__(self, recorder: _Recorder, k: int, meta: Dict[str, Any]) -> None:
        L, I = recorder.num_layers, recorder.intermediate
        super().__init__(torch.zeros(L, I, dtype=torch.int64), torch.zeros(L, I, dtype=torch.float64), 0, meta)
        self._recorder: Optional[_Recorder] = recorder
        self._k = k

    @property
    def recording(self) -> bool:
        """True inside the ``record`` block (the values still change)."""
        return self._recorder is not None

    def _refresh(self) -> None:
        if self._recorder is not None:
            self._over_zero, self._act_sum, self._n_tokens, self._experts = self._recorder.snapshot(self._k)

    @property
    def experts(self) -> Optional[ExpertStats]:
        self._refresh()
        return self._experts

    def _finish(self) -> None:
        self._refresh()
        self._recorder = None

    @property
    def over_zero(self) -> torch.Tensor:
        self._refresh()
        return self._over_zero

    @property
    def act_sum(self) -> Optional[torch.Tensor]:
        self._refresh()
        return self._act_sum

    @property
    def n_tokens(self) -> int:
        self._refresh()
        return self._n_tokens


class RecordingStatsByLanguage(StatsByLanguage):
    """``language -> RecordingStats`` of a running ``record`` block, with ``set_batch_languages``."""

    def __init__(self, recorder: _Recorder, stats: Dict[str, RecordingStats]) -> None:
        super().__init__(list(stats), stats)
        self._recorder: Optional[_Recorder] = recorder

    @property
    def recording(self) -> bool:
        return self._recorder is not None

    def set_batch_languages(self, ids: Any) -> None:
        """Which language each sequence (``[B]``) or token (``[B, S]``) of the following forwards
        belongs to: ints indexing ``languages`` or language names; -1 (or None) = not counted."""
        if self._recorder is None:
            super().set_batch_languages(ids)  # the block has ended: an error
        else:
            self._recorder.set_batch_languages(ids)

    def _finish(self) -> None:
        for entry in self.values():
            entry._finish()
        self._recorder = None


def _meta(model: nn.Module, recorder: _Recorder, language: Optional[str], fingerprint: Optional[str]) -> Dict[str, Any]:
    from ..version import __version__

    config = text_config(model)
    try:
        dtype = dtype_name(next(model.parameters()).dtype)
    except StopIteration:
        dtype = None
    return {
        "model": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "model_fingerprint": fingerprint,  # which model: lape_kernels.fingerprint
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "text_model_type": getattr(config, "model_type", None),
        "dtype": dtype,
        "num_layers": recorder.num_layers,
        "intermediate_size": recorder.intermediate,
        "activation": (recorder.mlps or recorder.experts)[0]._lape.activation,
        "language": language,
        "lape_kernels_version": __version__,
    }


@contextlib.contextmanager
def record(
    model: nn.Module, languages: Union[None, str, Sequence[str]] = None, *, fused_gemm: bool = False
) -> Iterator[Union[ActivationStats, StatsByLanguage]]:
    """Collect LAPE statistics of every forward run inside the block.

    ``languages=None`` (or one name) yields an ``ActivationStats``; a list yields a
    ``StatsByLanguage`` (call ``stats.set_batch_languages(ids)`` before each batch unless the
    list has one language). Padding (attention_mask == 0) is never counted; during
    ``model.generate()`` neither are the tokens fed to a sequence after its end-of-sequence
    token (generate pads finished sequences with attention mask 1): a sequence's generated
    tokens count up to and including its first EOS. The model is patched if needed, and
    unpatched on exit only if ``record`` patched it. ``model`` may be wrapped (PEFT, DDP,
    ``torch.compile``): the Hugging Face model inside is counted.

    ``fused_gemm=True`` counts with ``gate_up_act_mul_count``: on CUDA (Triton backend) one GEMM
    kernel computes gate and up and counts in its epilogue, so they never reach memory. gate/up
    are then the GEMM's fp32 accumulators, not rounded to the model's dtype (a sign can differ
    only where |gate| is within GEMM rounding of 0). MLPs with gate/up biases, autocast and
    forwards that need gradients use the standard path. On CPU the op is two fp32 GEMMs + the
    count: same counts, no faster.
    """
    if isinstance(languages, str):
        names: Optional[List[str]] = None
        single_name: Optional[str] = languages
    elif languages is None:
        names, single_name = None, None
    else:
        names, single_name = check_languages(languages), None
    if not isinstance(model, nn.Module):
        raise TypeError(f"record expects a torch.nn.Module, got {type(model).__name__}")
    model = unwrap(model)  # PEFT, DDP, torch.compile, ...: count the HF model inside
    was_patched = patching.is_patched(model)
    if not was_patched:
        patching.check_no_mlp_adapters(model, "record()")
    if not was_patched:
        patching.patch_mlps(model)
    recorder: Optional[_Recorder] = None
    try:
        with unsharded(model):  # FSDP2: the MLPs' full weights (shapes, devices) while it is set up
            recorder = _Recorder(model, names)
        recorder.fused_gemm = bool(fused_gemm)
        recorder.install()
        stats: Union[RecordingStats, RecordingStatsByLanguage]
        fingerprint = model_fingerprint(model)
        if names is None:
            stats = RecordingStats(recorder, 0, _meta(model, recorder, single_name, fingerprint))
        else:
            stats = RecordingStatsByLanguage(recorder, {
                l: RecordingStats(recorder, k, _meta(model, recorder, l, fingerprint)) for k, l in enumerate(names)})
        try:
            yield stats
        finally:
            stats._finish()  # final values on the CPU; the objects no longer reference the model
    finally:
        if recorder is not None:
            recorder.uninstall()
        if not was_patched:
            patching.unpatch(model)
