"""LAPE activation statistics: what ``record`` collects and ``identify`` consumes.

Per layer and neuron we keep ``over_zero`` (how many tokens had act(gate) > 0, exact int64)
and ``act_sum`` (sum of act(gate), float64), plus the token count ``n_tokens``: the same numbers
the LAPE reference gathers with forward hooks, but produced inside the fused MLP kernel
(``act_mul_count``) of the patched model, per language, with padding excluded from the
attention mask. Files are safetensors + JSON metadata (never pickle).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import patching

__all__ = ["ActivationStats", "StatsByLanguage", "record"]

_STATS_FORMAT = "lape_kernels.ActivationStats"
_SET_FORMAT = "lape_kernels.StatsByLanguage"
_VERSION = 1
_INDEX = "index.json"

PathLike = Union[str, os.PathLike]


def _as_count_tensor(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [num_layers, intermediate_size], got shape {tuple(x.shape)}")
    return x


def _as_int(n: Any, name: str) -> int:
    if isinstance(n, torch.Tensor):
        if n.numel() != 1 or n.dtype.is_floating_point or n.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer (or a 1-element integer tensor), got {n.dtype} {tuple(n.shape)}")
        n = int(n.item())
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return n


class ActivationStats:
    """LAPE statistics of one language (or one shard of it).

    ``over_zero`` int64 [L, I]: tokens with act(gate) > 0; ``act_sum`` float64 [L, I] (None when
    unknown, e.g. built from the LAPE reference's dict); ``n_tokens``: tokens seen (each counted
    once, not once per layer); ``meta``: JSON-serialisable facts (model, language, dtype, ...).

    While ``record`` is running the object reads the live (device) accumulators on access.
    """

    def __init__(
        self,
        over_zero: torch.Tensor,
        act_sum: Optional[torch.Tensor],
        n_tokens: int,
        meta: Optional[Dict[str, Any]] = None,
    ) -> None:
        over_zero = _as_count_tensor(over_zero, "over_zero")
        if over_zero.dtype.is_floating_point or over_zero.dtype.is_complex or over_zero.dtype == torch.bool:
            raise TypeError(f"over_zero must be an integer tensor (counts), got {over_zero.dtype}")
        over_zero = over_zero.to(torch.int64)
        if act_sum is not None:
            act_sum = _as_count_tensor(act_sum, "act_sum")
            if not act_sum.dtype.is_floating_point:
                raise TypeError(f"act_sum must be a floating-point tensor, got {act_sum.dtype}")
            if act_sum.shape != over_zero.shape:
                raise ValueError(
                    f"act_sum shape {tuple(act_sum.shape)} does not match over_zero shape {tuple(over_zero.shape)}"
                )
            act_sum = act_sum.to(torch.float64)
        n_tokens = _as_int(n_tokens, "n_tokens")
        if over_zero.numel():
            lo, hi = int(over_zero.min()), int(over_zero.max())
            if lo < 0 or hi > n_tokens:
                raise ValueError(
                    f"over_zero values must lie in [0, n_tokens={n_tokens}], got [{lo}, {hi}] "
                    "(counts and token total from different runs?)"
                )
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        self._over_zero = over_zero
        self._act_sum = act_sum
        self._n_tokens = n_tokens
        self.meta = dict(meta)
        self._live: Optional[Tuple["_Recorder", int]] = None

    # -- live view while recording ---------------------------------------------------------
    def _sync(self) -> None:
        if self._live is not None:
            recorder, k = self._live
            self._over_zero, self._act_sum, self._n_tokens = recorder.snapshot(k)

    @property
    def over_zero(self) -> torch.Tensor:
        self._sync()
        return self._over_zero

    @property
    def act_sum(self) -> Optional[torch.Tensor]:
        self._sync()
        return self._act_sum

    @property
    def n_tokens(self) -> int:
        self._sync()
        return self._n_tokens

    @property
    def num_layers(self) -> int:
        return self._over_zero.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self._over_zero.shape[1]

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.num_layers, self.intermediate_size)

    def __repr__(self) -> str:
        lang = self.meta.get("language")
        return (
            f"ActivationStats(layers={self.num_layers}, intermediate={self.intermediate_size}, "
            f"n_tokens={self.n_tokens}" + (f", language={lang!r}" if lang is not None else "") + ")"
        )

    # -- derived quantities --------------------------------------------------------------------
    def activation_probability(self) -> torch.Tensor:
        """P(act(gate) > 0) per layer and neuron: over_zero / n_tokens, float32 [L, I]."""
        n = self.n_tokens
        if n == 0:
            raise ValueError("activation_probability: no tokens were recorded (n_tokens == 0)")
        return (self.over_zero.to(torch.float64) / n).to(torch.float32)

    def mean_activation(self) -> torch.Tensor:
        """Mean act(gate) per layer and neuron: act_sum / n_tokens, float32 [L, I]."""
        n, act_sum = self.n_tokens, self.act_sum
        if act_sum is None:
            raise ValueError("mean_activation: these stats carry no act_sum (built from a LAPE over_zero dict)")
        if n == 0:
            raise ValueError("mean_activation: no tokens were recorded (n_tokens == 0)")
        return (act_sum / n).to(torch.float32)

    # -- combining shards ----------------------------------------------------------------------
    def _check_compatible(self, other: "ActivationStats") -> None:
        if not isinstance(other, ActivationStats):
            raise TypeError(f"can only add ActivationStats to ActivationStats, got {type(other).__name__}")
        if self.shape != other.shape:
            a, b = self.shape, other.shape
            what = "layer counts" if a[0] != b[0] else "intermediate sizes"
            raise ValueError(
                f"cannot add ActivationStats with different {what}: [layers, intermediate] = {list(a)} vs {list(b)} "
                "(stats of different models?)"
            )

    def __add__(self, other: "ActivationStats") -> "ActivationStats":
        self._check_compatible(other)
        act_sum = None if self.act_sum is None or other.act_sum is None else self.act_sum + other.act_sum
        # meta: keep what both shards agree on (a key only one side has is kept too)
        meta = dict(other.meta)
        meta.update(self.meta)
        for key in set(self.meta) & set(other.meta):
            if self.meta[key] != other.meta[key]:
                del meta[key]
        return ActivationStats(self.over_zero + other.over_zero, act_sum, self.n_tokens + other.n_tokens, meta)

    def __radd__(self, other: Any) -> "ActivationStats":
        if isinstance(other, int) and other == 0:  # sum(shards)
            return self
        return NotImplemented

    @classmethod
    def merge(cls, shards: Iterable["ActivationStats"]) -> "ActivationStats":
        """Sum of shards (e.g. collected by several processes)."""
        shards = list(shards)
        if not shards:
            raise ValueError("merge needs at least one ActivationStats")
        out = shards[0]
        for s in shards[1:]:
            out = out + s
        return out

    def equal(self, other: "ActivationStats") -> bool:
        """Exact equality of counts, sums and token totals (meta ignored)."""
        if not isinstance(other, ActivationStats) or self.shape != other.shape or self.n_tokens != other.n_tokens:
            return False
        if not torch.equal(self.over_zero, other.over_zero):
            return False
        if (self.act_sum is None) != (other.act_sum is None):
            return False
        return self.act_sum is None or torch.equal(self.act_sum, other.act_sum)

    # -- LAPE reference format -----------------------------------------------------------------
    def to_lape_dict(self) -> Dict[str, Any]:
        """``{'n': int, 'over_zero': int64 [L, I]}``: what the LAPE reference's activation script saves."""
        return {"n": self.n_tokens, "over_zero": self.over_zero.clone()}

    @classmethod
    def from_lape_dict(cls, d: Dict[str, Any], meta: Optional[Dict[str, Any]] = None) -> "ActivationStats":
        """From the LAPE reference's ``{'n', 'over_zero'}`` dict (act_sum is then unknown: None)."""
        if not isinstance(d, dict) or "n" not in d or "over_zero" not in d:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"a LAPE stats dict has keys 'n' and 'over_zero', got {got}")
        return cls(d["over_zero"], None, _as_int(d["n"], "d['n']"), meta)

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: PathLike) -> None:
        """One safetensors file: tensors ``over_zero`` (+ ``act_sum``), JSON metadata."""
        from safetensors.torch import save_file

        try:
            meta_json = json.dumps(self.meta, sort_keys=True)
        except TypeError as e:
            raise TypeError(f"ActivationStats.meta must be JSON-serialisable to save: {e}") from None
        tensors = {"over_zero": self.over_zero.detach().cpu().contiguous()}
        if self.act_sum is not None:
            tensors["act_sum"] = self.act_sum.detach().cpu().contiguous()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            tensors,
            str(path),
            metadata={
                "format": _STATS_FORMAT,
                "version": str(_VERSION),
                "n_tokens": str(self.n_tokens),
                "meta": meta_json,
            },
        )

    @classmethod
    def load(cls, path: PathLike) -> "ActivationStats":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ActivationStats file at {str(path)!r}")
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            if md.get("format") != _STATS_FORMAT:
                raise ValueError(
                    f"{str(path)!r} is not an ActivationStats file (metadata format {md.get('format')!r}); "
                    "for the LAPE reference's torch.save dict use ActivationStats.from_lape_dict"
                )
            if int(md.get("version", "0")) > _VERSION:
                raise ValueError(f"{str(path)!r} has format version {md['version']}, newer than this library's {_VERSION}")
            keys = set(f.keys())
            over_zero = f.get_tensor("over_zero")
            act_sum = f.get_tensor("act_sum") if "act_sum" in keys else None
        return cls(over_zero, act_sum, int(md["n_tokens"]), json.loads(md.get("meta", "{}")))


def _safe_file_stem(lang: str, index: int) -> str:
    if re.fullmatch(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*", lang) and lang not in (".", ".."):
        return lang
    return f"language_{index}"


class StatsByLanguage(dict):
    """``language -> ActivationStats``, in the order of ``languages``.

    While recording, ``set_batch_languages(ids)`` says which language each sequence (``[B]``)
    or token (``[B, S]``) of the following forwards belongs to: ints indexing ``languages`` or
    language names; -1 (or None) = not counted.
    """

    def __init__(self, languages: Sequence[str], stats: Optional[Dict[str, ActivationStats]] = None) -> None:
        languages = _check_languages(languages)
        super().__init__()
        self.languages: List[str] = languages
        self._recorder: Optional["_Recorder"] = None
        if stats is not None:
            missing = [l for l in languages if l not in stats]
            extra = [l for l in stats if l not in languages]
            if missing or extra:
                raise ValueError(f"stats keys must be exactly the languages: missing {missing}, unexpected {extra}")
            for lang in languages:
                if not isinstance(stats[lang], ActivationStats):
                    raise TypeError(f"stats[{lang!r}] must be ActivationStats, got {type(stats[lang]).__name__}")
                self[lang] = stats[lang]

    def set_batch_languages(self, ids: Any) -> None:
        if self._recorder is None:
            raise RuntimeError("set_batch_languages only works inside `with record(model, languages) as stats:`")
        self._recorder.set_batch_languages(ids)

    def __add__(self, other: "StatsByLanguage") -> "StatsByLanguage":
        if not isinstance(other, StatsByLanguage):
            raise TypeError(f"can only add StatsByLanguage to StatsByLanguage, got {type(other).__name__}")
        languages = list(self.languages) + [l for l in other.languages if l not in self.languages]
        merged = {}
        for lang in languages:
            if lang in self and lang in other:
                merged[lang] = self[lang] + other[lang]
            else:
                merged[lang] = self[lang] if lang in self else other[lang]
        return StatsByLanguage(languages, merged)

    def save(self, directory: PathLike) -> None:
        """``directory/index.json`` + one ActivationStats safetensors file per language."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = {}
        for i, lang in enumerate(self.languages):
            name = _safe_file_stem(lang, i) + ".safetensors"
            self[lang].save(directory / name)
            files[lang] = name
        index = {"format": _SET_FORMAT, "version": _VERSION, "languages": self.languages, "files": files}
        (directory / _INDEX).write_text(json.dumps(index, indent=1, ensure_ascii=False))

    @classmethod
    def load(cls, directory: PathLike) -> "StatsByLanguage":
        directory = Path(directory)
        index_path = directory / _INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"no StatsByLanguage at {str(directory)!r} (missing {_INDEX})")
        index = json.loads(index_path.read_text())
        if index.get("format") != _SET_FORMAT:
            raise ValueError(f"{str(index_path)!r} is not a StatsByLanguage index (format {index.get('format')!r})")
        languages = index["languages"]
        return cls(languages, {lang: ActivationStats.load(directory / index["files"][lang]) for lang in languages})


def _check_languages(languages: Any) -> List[str]:
    if isinstance(languages, str) or not isinstance(languages, (list, tuple)):
        raise TypeError(f"languages must be a list of language names, got {type(languages).__name__}")
    languages = list(languages)
    if not languages:
        raise ValueError("languages must not be empty")
    bad = [l for l in languages if not isinstance(l, str) or not l]
    if bad:
        raise TypeError(f"language names must be non-empty strings, got {bad}")
    dup = sorted({l for l in languages if languages.count(l) > 1})
    if dup:
        raise ValueError(f"duplicate languages: {dup}")
    return languages


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
    ``patching._lape_mlp_forward``) and token totals from the decoder body's pre-hook."""

    def __init__(self, model: nn.Module, languages: Optional[List[str]]) -> None:
        self.model = model
        self.body = patching.decoder_body(model)
        self.mlps = patching.patched_mlps(model)
        sparse = [m._lape.layer_index for m in self.mlps if m._lape.sparse is not None]
        if sparse:
            raise RuntimeError(
                f"record(): layers {sparse} run the sparse-training forward, which does not count; "
                "merge or unpatch the trained neurons first"
            )
        self.languages = languages
        self.num_langs = len(languages) if languages else 1
        sizes = {patching.weights(m)[0].shape[0] for m in self.mlps}
        if len(sizes) != 1:
            raise ValueError(f"record needs one intermediate size for all layers, got {sorted(sizes)}")
        self.intermediate = sizes.pop()
        self.num_layers = len(self.mlps)
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
            # per-language token totals (+ bucket 0 for skipped tokens), on the embeddings' device
            self.n_device = torch.zeros(self.num_langs + 1, dtype=torch.int64, device=self._input_device())
        self.n_host = [0] * self.num_langs  # fast path (no mask, one language): no device op
        self.batch_lang: Optional[torch.Tensor] = None  # CPU int64 [B] or [B, S]
        self._batch_lang_dev: Dict[torch.device, torch.Tensor] = {}
        self.ctx: Optional[_ForwardContext] = None
        self.outer_masks: List[Optional[torch.Tensor]] = []  # 2-D masks of enclosing calls
        self.body_sig: Optional[inspect.Signature] = None
        self.handles: list = []
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

    # -- decoder body hooks --------------------------------------------------------------------
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if _in_backward():
            return
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

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not _in_backward():
            self.ctx = None

    def _outer_pre_hook(self, sig: Optional[inspect.Signature]):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not _in_backward():
                m = _call_arg(sig, args, kwargs, "attention_mask", None)
                self.outer_masks.append(m if isinstance(m, torch.Tensor) and m.dim() == 2 else None)

        return hook

    def _outer_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not _in_backward() and self.outer_masks:
            self.outer_masks.pop()

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
    def snapshot(self, k: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """Language ``k``'s totals so far, as new CPU tensors (normal, not inference tensors)."""
        with torch.inference_mode(False):
            over_zero = torch.stack([t[k].to("cpu", copy=True) for t in self.over_zero])
            act_sum = torch.stack([t[k].to("cpu", copy=True) for t in self.act_sum])
            n = self.n_host[k] + int(self.n_device[k + 1].item())
        return over_zero, act_sum, n

    def install(self) -> None:
        busy = [m._lape.layer_index for m in self.mlps if m._lape.recorder is not None]
        if busy:
            raise RuntimeError("record(): this model is already being recorded (nested record() on the same model)")
        for m in self.mlps:
            m._lape.recorder = self
        self.body_sig = _signature(self.body)
        self.handles.append(self.body.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        self.handles.append(self.body.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True))
        for outer in _ancestors(self.model, self.body):
            sig = _signature(outer)
            self.handles.append(outer.register_forward_pre_hook(self._outer_pre_hook(sig), with_kwargs=True))
            self.handles.append(outer.register_forward_hook(self._outer_post_hook, with_kwargs=True, always_call=True))

    def uninstall(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for m in self.mlps:
            st = getattr(m, "_lape", None)
            if st is not None and st.recorder is self:
                st.recorder = None
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


def _ancestors(model: nn.Module, body: nn.Module) -> List[nn.Module]:
    """The modules enclosing ``body`` inside ``model`` (``model`` included, ``body`` not)."""
    for name, module in model.named_modules():
        if module is body:
            parts = name.split(".") if name else []
            out, cur = [], model
            for part in parts[:-1]:
                cur = getattr(cur, part)
                out.append(cur)
            return ([model] if name else []) + out
    return []


def _meta(model: nn.Module, recorder: _Recorder, language: Optional[str]) -> Dict[str, Any]:
    from . import __version__

    config = patching.text_config(model)
    try:
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    except StopIteration:
        dtype = None
    return {
        "model": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "text_model_type": getattr(config, "model_type", None),
        "dtype": dtype,
        "num_layers": recorder.num_layers,
        "intermediate_size": recorder.intermediate,
        "activation": recorder.mlps[0]._lape.activation,
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
    list has one language). Padding (attention_mask == 0) is never counted. The model is patched
    if needed, and unpatched on exit only if ``record`` patched it.

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
        names, single_name = _check_languages(languages), None
    if not isinstance(model, nn.Module):
        raise TypeError(f"record expects a torch.nn.Module, got {type(model).__name__}")
    was_patched = patching.is_patched(model)
    if not was_patched:
        patching.patch(model, chunked_loss=False)
    recorder: Optional[_Recorder] = None
    try:
        recorder = _Recorder(model, names)
        recorder.fused_gemm = bool(fused_gemm)
        recorder.install()
        if names is None:
            stats: Union[ActivationStats, StatsByLanguage] = _live_stats(recorder, 0, _meta(model, recorder, single_name))
        else:
            stats = StatsByLanguage(names, {l: _live_stats(recorder, k, _meta(model, recorder, l)) for k, l in enumerate(names)})
            stats._recorder = recorder
        try:
            yield stats
        finally:
            # final values on the CPU; the objects no longer reference the model
            entries = [stats] if isinstance(stats, ActivationStats) else list(stats.values())
            for entry in entries:
                entry._sync()
                entry._live = None
            if isinstance(stats, StatsByLanguage):
                stats._recorder = None
    finally:
        if recorder is not None:
            recorder.uninstall()
        if not was_patched:
            patching.unpatch(model)


def _live_stats(recorder: _Recorder, k: int, meta: Dict[str, Any]) -> ActivationStats:
    L, I = recorder.num_layers, recorder.intermediate
    stats = ActivationStats(torch.zeros(L, I, dtype=torch.int64), torch.zeros(L, I, dtype=torch.float64), 0, meta)
    stats._live = (recorder, k)
    return stats
