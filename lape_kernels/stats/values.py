"""LAPE activation statistics as values: what ``record`` collects and ``identify`` consumes.

Per layer and neuron we keep ``over_zero`` (how many tokens had act(gate) > 0, exact int64)
and ``act_sum`` (sum of act(gate), float64), plus the token count ``n_tokens``: the same numbers
the LAPE reference gathers with forward hooks. This module owns what makes such numbers valid
and combinable (:class:`ActivationStats` checks them on construction, :func:`check_same_shape`
before any combination, ``check_same_model`` too: statistics of two different models never mix);
how they are collected is ``recorder.py``'s business. Files are safetensors + JSON metadata
(never pickle). ``meta["model_fingerprint"]`` (written by ``record``, see
``lape_kernels.fingerprint``) names the model the numbers come from.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..files import open_safetensors
from ..fingerprint import check_model, check_one_model, recorded_model, unknown_note
from ..introspection import expert_shape, mlp_shape, model_shape
from .experts import ExpertStats
from ..languages import check_languages

__all__ = ["ActivationStats", "StatsByLanguage", "check_same_shape", "check_same_model", "safe_file_stem"]

_STATS_FORMAT = "lape_kernels.ActivationStats"
_SET_FORMAT = "lape_kernels.StatsByLanguage"
_VERSION = 1
_INDEX = "index.json"

PathLike = Union[str, os.PathLike]


def _as_count_tensor(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor (torch.Tensor), got {type(x).__name__}")
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
    once, not once per layer); ``meta``: JSON-serialisable facts (model, its fingerprint,
    language, dtype, ...). The three numbers are read-only properties (``record`` yields a
    subclass whose values follow the recording). ``source``: the file it was loaded from.
    """

    def __init__(
        self,
        over_zero: torch.Tensor,
        act_sum: Optional[torch.Tensor],
        n_tokens: int,
        meta: Optional[Dict[str, Any]] = None,
        *,
        experts: Optional[ExpertStats] = None,
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
            if lo < 0:
                raise ValueError(f"over_zero has negative counts (min {lo}); counts lie in [0, n_tokens={n_tokens}]")
            if hi > n_tokens:
                raise ValueError(
                    f"over_zero has counts above n_tokens={n_tokens} (max {hi}): counts and token total must "
                    "come from the same tokens (different runs?)"
                )
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        if experts is not None:
            if not isinstance(experts, ExpertStats):
                raise TypeError(f"experts must be an ExpertStats, got {type(experts).__name__}")
            if experts.routed.numel() and int(experts.routed.max()) > n_tokens:
                raise ValueError(f"experts.routed has an expert with {int(experts.routed.max())} tokens, above "
                                 f"n_tokens={n_tokens}")
        self._experts = experts
        self._over_zero = over_zero
        self._act_sum = act_sum
        self._n_tokens = n_tokens
        self.meta = dict(meta)
        self.source: Optional[str] = None

    @property
    def over_zero(self) -> torch.Tensor:
        return self._over_zero

    @property
    def act_sum(self) -> Optional[torch.Tensor]:
        return self._act_sum

    @property
    def n_tokens(self) -> int:
        return self._n_tokens

    @property
    def experts(self) -> Optional[ExpertStats]:
        """The routed experts' statistics of a mixture-of-experts model (None for a dense model):
        ``layers``, ``over_zero`` / ``act_sum`` ``[len(layers), experts, intermediate]`` over
        the tokens routed to each expert, ``routed`` ``[len(layers), experts]``."""
        return self._experts

    @property
    def num_layers(self) -> int:
        return self._over_zero.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self._over_zero.shape[1]

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.num_layers, self.intermediate_size)

    @property
    def model_fingerprint(self) -> Optional[str]:
        """The fingerprint of the model these numbers come from (None: unknown, see ``notes``)."""
        return recorded_model(self.meta)[0]

    @property
    def notes(self) -> List[str]:
        """What is not known about these statistics (e.g. no model fingerprint: an old file)."""
        if self.model_fingerprint is not None:
            return []
        if "model_fingerprint" in self.meta:  # record() could not read the weights
            return [unknown_note(self._label(), "the model's weights could not be read when recording: meta or "
                                                "sharded tensors")]
        return [unknown_note(self._label())]

    def _label(self) -> str:
        lang = self.meta.get("language")
        if self.source is not None:
            return f"statistics {self.source}"
        return f"statistics of {lang!r}" if lang is not None else "these statistics"

    def validate(self, model: Any, *, allow_other_model: bool = False) -> "ActivationStats":
        """Check these statistics belong to ``model`` (a HF model, or a config for the shape only):
        ``[layers, intermediate]`` shape, and, for a model, its fingerprint (``ModelMismatchError``
        naming both models; ``allow_other_model=True`` for a deliberate transfer). Unknown
        fingerprints are accepted (see ``notes``). Returns ``self``."""
        if isinstance(model, torch.nn.Module):
            num_layers, _, inter = mlp_shape(model)
            ex = expert_shape(model)
            have = None if self.experts is None else (list(self.experts.layers), list(self.experts.shape[1:]))
            want = None if ex is None else (list(ex.layers), [ex.num_experts, ex.intermediate_size])
            if have != want:
                raise ValueError(f"{self._label()} have expert statistics (layers, [experts, intermediate]) {have}, "
                                 f"the model has {want}")
        else:
            num_layers, inter = model_shape(model)
        if (num_layers, inter) != self.shape:
            raise ValueError(f"{self._label()} have shape [layers, intermediate] = {list(self.shape)}, "
                             f"the model has {[num_layers, inter]}")
        if isinstance(model, torch.nn.Module):
            check_model(self.model_fingerprint, recorded_model(self.meta)[1], model, self._label(),
                        allow_other_model=allow_other_model, way_out="pass validate(model, allow_other_model=True)")
        return self

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
    def __add__(self, other: "ActivationStats") -> "ActivationStats":
        if not isinstance(other, ActivationStats):
            raise TypeError(f"can only add ActivationStats to ActivationStats, got {type(other).__name__}")
        check_same_shape({"left": self, "right": other}, "add")
        check_same_model({"left": self, "right": other}, "add")
        act_sum = None if self.act_sum is None or other.act_sum is None else self.act_sum + other.act_sum
        # meta: keep what both shards agree on (a key only one side has is kept too)
        meta = dict(other.meta)
        meta.update(self.meta)
        for key in set(self.meta) & set(other.meta):
            if self.meta[key] != other.meta[key]:
                del meta[key]
        experts = None if self.experts is None else self.experts + other.experts
        return ActivationStats(self.over_zero + other.over_zero, act_sum, self.n_tokens + other.n_tokens, meta,
                               experts=experts)

    def __radd__(self, other: Any) -> "ActivationStats":
        if isinstance(other, int) and other == 0:  # sum(shards)
            return self
        return NotImplemented

    @classmethod
    def sum(cls, shards: Iterable["ActivationStats"]) -> "ActivationStats":
        """Sum of shards (e.g. collected by several processes): counts, sums and token totals add."""
        shards = list(shards)
        if not shards:
            raise ValueError("ActivationStats.sum needs at least one ActivationStats")
        out = shards[0]
        for s in shards[1:]:
            out = out + s
        return out

    def all_reduce(self, group: Any = None) -> "ActivationStats":
        """The sum of these statistics over every process of ``group`` (the default process
        group of ``torch.distributed``): ``over_zero``, ``act_sum``, ``n_tokens`` and the experts'
        counts added across ranks, as a new object (``self`` unchanged) whose ``meta`` records
        ``world_size``. Every rank must call it (a collective), with statistics of the same model
        and shape (checked first: a mismatch raises on every rank, never a wrong sum). Without a
        process group it returns a copy, so a user's DDP/FSDP2 loop works the same with one
        process."""
        return _all_reduce({None: self}, group)[None]

    def equal(self, other: "ActivationStats") -> bool:
        """Exact equality of counts, sums and token totals (meta ignored)."""
        if not isinstance(other, ActivationStats) or self.shape != other.shape or self.n_tokens != other.n_tokens:
            return False
        if not torch.equal(self.over_zero, other.over_zero):
            return False
        if (self.act_sum is None) != (other.act_sum is None):
            return False
        if (self.experts is None) != (other.experts is None) or (self.experts is not None and
                                                                 not self.experts.equal(other.experts)):
            return False
        return self.act_sum is None or torch.equal(self.act_sum, other.act_sum)

    # -- LAPE reference format -----------------------------------------------------------------
    def to_lape_dict(self) -> Dict[str, Any]:
        """``{'n': int, 'over_zero': int64 [L, I]}``: what the LAPE reference's activation script saves
        (dense models only: the reference has no experts)."""
        if self.experts is not None:
            raise ValueError("to_lape_dict: the LAPE reference format has no experts (these statistics come from a "
                             "mixture-of-experts model); save them with .save()")
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
        extra = {}
        if self.experts is not None:
            tensors.update(self.experts.tensors())
            extra["experts_layers"] = json.dumps(list(self.experts.layers))
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
                **extra,
            },
        )

    @classmethod
    def load(cls, path: PathLike) -> "ActivationStats":
        """Read a file written by :meth:`save`; every error names the file and the cause. A file
        without a model fingerprint (written before they existed) loads, see ``notes``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ActivationStats file at {str(path)!r}")
        with open_safetensors(path) as f:
            md = f.metadata() or {}
            if md.get("format") != _STATS_FORMAT:
                raise ValueError(
                    f"{str(path)!r} is not an ActivationStats file (metadata format {md.get('format')!r}); "
                    "for the LAPE reference's torch.save dict use ActivationStats.from_lape_dict"
                )
            try:
                version, n_tokens = int(md.get("version", "0")), int(md["n_tokens"])
                meta = json.loads(md.get("meta", "{}"))
            except (KeyError, ValueError) as exc:
                raise ValueError(f"{str(path)!r}: malformed ActivationStats metadata ({type(exc).__name__}: {exc})") from None
            if version > _VERSION:
                raise ValueError(f"{str(path)!r} has format version {md['version']}, newer than this library's {_VERSION}")
            keys = set(f.keys())
            if "over_zero" not in keys:
                raise ValueError(f"{str(path)!r}: no 'over_zero' tensor (has {sorted(keys)})")
            over_zero = f.get_tensor("over_zero")
            act_sum = f.get_tensor("act_sum") if "act_sum" in keys else None
            expert_tensors = {k: f.get_tensor(k) for k in keys if k.startswith("experts.")}
        try:
            experts = None
            if "experts_layers" in md or expert_tensors:
                experts = ExpertStats.from_tensors(json.loads(md.get("experts_layers", "null")) or [], expert_tensors)
            stats = cls(over_zero, act_sum, n_tokens, meta, experts=experts)
        except (TypeError, ValueError) as exc:  # json errors are ValueErrors
            raise ValueError(f"{str(path)!r}: {exc}") from None
        stats.source = str(path)
        return stats


def check_same_shape(stats: Mapping[str, ActivationStats], action: str) -> Tuple[int, int]:
    """The rule for combining statistics (adding shards, identifying across languages): every
    entry has the same ``[layers, intermediate]`` shape. Returns that shape."""
    items = list(stats.items())
    if not items:
        raise ValueError(f"cannot {action} an empty collection of ActivationStats")
    first_name, first = items[0]
    for name, other in items[1:]:
        a, b = (None if s.experts is None else s.experts.key() for s in (first, other))
        if a != b:
            raise ValueError(f"cannot {action} ActivationStats with different experts ((layers, [layers, experts, "
                             f"intermediate]) {a} vs {b}: {first_name!r} vs {name!r}; stats of different models?)")
        if other.shape != first.shape:
            a, b = first.shape, other.shape
            what = "layer counts" if a[0] != b[0] else "intermediate sizes"
            raise ValueError(
                f"cannot {action} ActivationStats with different {what}: [layers, intermediate] = {list(a)} vs "
                f"{list(b)} ({first_name!r} vs {name!r}: shapes differ; stats of different models?)"
            )
    return first.shape


def check_same_model(stats: Mapping[str, ActivationStats], action: str) -> Optional[str]:
    """The rule for combining statistics across shards or languages: they come from one model
    (equal fingerprints where known; ``ModelMismatchError`` names two entries and their models).
    Returns the common fingerprint (None if none is known)."""
    labels = {name: repr(name) + (f" ({s.source})" if s.source else "") for name, s in stats.items()}
    return check_one_model({labels[name]: recorded_model(s.meta) for name, s in stats.items()}, action)[0]


def safe_file_stem(lang: str, index: int) -> str:
    """A file name stem for ``lang`` (its own name when that is a safe file name)."""
    if re.fullmatch(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*", lang) and lang not in (".", ".."):
        return lang
    return f"language_{index}"


class StatsByLanguage(dict):
    """``language -> ActivationStats``, in the order of ``languages``.

    ``record(model, languages)`` yields a subclass on which ``set_batch_languages(ids)`` says
    which language each sequence (``[B]``) or token (``[B, S]``) of the following forwards
    belongs to; on stored statistics it is an error.
    """

    def __init__(self, languages: Sequence[str], stats: Optional[Dict[str, ActivationStats]] = None) -> None:
        languages = check_languages(languages)
        super().__init__()
        self.languages: List[str] = languages
        if stats is not None:
            missing = [l for l in languages if l not in stats]
            extra = [l for l in stats if l not in languages]
            if missing or extra:
                raise ValueError(f"stats keys must be exactly the languages: missing {missing}, unexpected {extra}")
            for lang in languages:
                if not isinstance(stats[lang], ActivationStats):
                    raise TypeError(f"stats[{lang!r}] must be ActivationStats, got {type(stats[lang]).__name__}")
                self[lang] = stats[lang]
            check_same_model(self, "group")

    @property
    def model_fingerprint(self) -> Optional[str]:
        """The fingerprint of the model (the languages' common one; None: unknown)."""
        return check_same_model(self, "group") if self else None

    def validate(self, model: Any, *, allow_other_model: bool = False) -> "StatsByLanguage":
        """:meth:`ActivationStats.validate` for every language. Returns ``self``."""
        for entry in self.values():
            entry.validate(model, allow_other_model=allow_other_model)
        return self

    def set_batch_languages(self, ids: Any) -> None:
        """Only while recording (see ``record``): these statistics are no longer collected."""
        raise RuntimeError("set_batch_languages only works inside `with record(model, languages) as stats:`")

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

    def all_reduce(self, group: Any = None) -> "StatsByLanguage":
        """Every language's :meth:`ActivationStats.all_reduce` in one collective per dtype
        (the languages must be the same, in the same order, on every rank)."""
        return StatsByLanguage(self.languages, _all_reduce({lang: self[lang] for lang in self.languages}, group))

    def save(self, directory: PathLike) -> None:
        """``directory/index.json`` + one ActivationStats safetensors file per language."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = {}
        for i, lang in enumerate(self.languages):
            name = safe_file_stem(lang, i) + ".safetensors"
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
        try:
            index = json.loads(index_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{str(index_path)!r}: not a valid JSON index ({type(exc).__name__}: {exc})") from None
        if not isinstance(index, dict) or index.get("format") != _SET_FORMAT:
            got = index.get("format") if isinstance(index, dict) else type(index).__name__
            raise ValueError(f"{str(index_path)!r} is not a StatsByLanguage index (format {got!r})")
        languages, files = index.get("languages"), index.get("files")
        if not isinstance(languages, list) or not isinstance(files, dict) or any(l not in files for l in languages):
            raise ValueError(f"{str(index_path)!r}: malformed index ('languages' must be a list, each with an entry "
                             "in 'files')")
        loaded = {lang: ActivationStats.load(directory / files[lang]) for lang in languages}
        try:
            return cls(languages, loaded)
        except ValueError as exc:  # e.g. languages of different models
            raise type(exc)(f"{str(directory)!r}: {exc}") from None


def _all_reduce(stats: Dict[Any, ActivationStats], group: Any) -> Dict[Any, ActivationStats]:
    """``stats`` (one language, or several) summed over the ranks of ``group`` (see
    :meth:`ActivationStats.all_reduce`)."""
    from .. import distributed

    signature: List[int] = [len(stats)]
    tensors: List[torch.Tensor] = []
    for name, s in stats.items():
        ex = s.experts
        signature += [distributed.name_hash(None if name is None else str(name)), *s.shape,
                      int(s.act_sum is not None), distributed.name_hash(s.model_fingerprint)]
        signature += [-1] if ex is None else [*ex.layers, *ex.shape, int(ex.act_sum is not None)]
        tensors += [s.over_zero, torch.tensor([s.n_tokens], dtype=torch.int64)]
        tensors += [] if s.act_sum is None else [s.act_sum]
        tensors += [] if ex is None else list(ex.tensors().values())
    distributed.check_same_everywhere(signature, "statistics (languages, shapes, experts, model fingerprints)", group)
    summed = iter(distributed.all_reduce_sum(tensors, group))
    world = distributed.world_size(group)
    out: Dict[Any, ActivationStats] = {}
    for name, s in stats.items():
        ex = s.experts
        over_zero, n = next(summed), int(next(summed).item())
        act_sum = None if s.act_sum is None else next(summed)
        experts = None
        if ex is not None:
            keys = list(ex.tensors())
            experts = ExpertStats.from_tensors(ex.layers, {k: next(summed) for k in keys})
        out[name] = ActivationStats(over_zero, act_sum, n, {**s.meta, "world_size": world}, experts=experts)
    return out
