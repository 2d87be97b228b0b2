"""Language-neuron sets: per-language, per-layer sorted int64 indices into the MLP
intermediate dimension, with metadata, set operations, random baselines and save/load
(the LAPE reference format and our safetensors + JSON format).

Why a class rather than the reference's bare ``list[lang][layer]``: the bare list carries no
language names, no shape and no provenance, so a mask made for one model silently indexes
another. `NeuronSet` keeps names, ``num_layers``, ``intermediate_size`` and metadata together
and checks indices on construction (integer, 1-D, in range, unique; sorted ascending), plus the
fingerprint of the model it was identified in (``lape_kernels.fingerprint``): ``validate(model)``
refuses another model's weights unless the transfer is explicit.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..files import open_safetensors
from ..fingerprint import check_model, describe_model, model_fingerprint, model_name, unknown_note
from ..introspection import expert_shape, mlp_shape, model_shape
from ..languages import check_languages
from .indices import (ExpertLayout, PerExpert, check_expert_indices, check_layer_indices, expert_tensors,
                      layout_of, random_units, read_expert_tensors, read_offset_table)
from .reference_file import NeuronSetFormatError, read_reference

__all__ = ["NeuronSet", "NeuronSetFormatError", "PerLayer", "PerExpert", "ExpertLayout", "check_layer_indices"]

FORMAT_NAME = "lape_kernels.neuron_set"
FORMAT_VERSION = 1  # dense sets; a set with expert neurons is written as version 2 (older readers refuse it)
FORMAT_VERSION_EXPERTS = 2
_JSON_NAME = "neurons.json"
_TENSORS_NAME = "neurons.safetensors"

PerLayer = List[torch.Tensor]


class NeuronSet:
    """Selected neurons per language and layer.

    ``neurons``: ``{language: [indices of layer 0, ..., layer L-1]}``. Each layer's indices are
    integers in ``[0, intermediate_size)`` without duplicates; they are stored as sorted CPU
    int64 tensors. Unsorted input is sorted and a note is recorded in ``notes`` (the reference
    always writes sorted indices, so unsorted input means some other producer).
    ``intermediate_size`` may be ``None`` when unknown (a reference-format file does not store
    it); methods that need it say so. ``model_fingerprint``: the model the set was identified in
    (``None``: unknown, e.g. a reference-format file; ``notes`` says why). ``source``: the path it
    was loaded from.

    Mixture-of-experts models: ``experts`` ``{language: PerExpert}`` holds each language's expert
    neurons, a list over the MoE layers of lists over experts of index tensors into the expert's
    intermediate dimension, laid out as ``expert_layout`` ``(layers, num_experts,
    intermediate_size)`` (``layers``: the decoder-layer indices of the MoE layers, as
    ``ActivationStats.experts.layers``). ``neurons`` keeps the dense MLPs' neurons (a shared
    expert's, e.g. Qwen2-MoE); a model with no dense MLP has ``num_layers=0`` and empty lists.
    """

    def __init__(
        self,
        neurons: Mapping[str, Sequence[Any]],
        num_layers: int,
        intermediate_size: Optional[int],
        *,
        model_id: Optional[str] = None,
        hidden_size: Optional[int] = None,
        thresholds: Optional[Mapping[str, float]] = None,
        tokens_per_language: Optional[Mapping[str, int]] = None,
        notes: Optional[Iterable[str]] = None,
        model_fingerprint: Optional[str] = None,
        experts: Optional[Mapping[str, Sequence[Any]]] = None,
        expert_layout: Any = None,
    ) -> None:
        if not isinstance(neurons, Mapping):
            raise TypeError(f"neurons must be a mapping language -> per-layer indices, got {type(neurons).__name__}")
        if (experts is None) != (expert_layout is None):
            raise ValueError("experts= and expert_layout= go together (expert neurons and the MoE layers they index)")
        self.expert_layout: Optional[ExpertLayout] = None if expert_layout is None else layout_of(expert_layout)
        no_dense = num_layers == 0 and self.expert_layout is not None  # a MoE model without dense MLPs
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or (num_layers <= 0 and not no_dense):
            raise ValueError(f"num_layers must be a positive int (0 only with expert neurons), got {num_layers!r}")
        if intermediate_size is not None and (
            isinstance(intermediate_size, bool) or not isinstance(intermediate_size, int)
            or (intermediate_size <= 0 and not (no_dense and intermediate_size == 0))
        ):
            raise ValueError(f"intermediate_size must be a positive int or None, got {intermediate_size!r}")
        if hidden_size is not None and (isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0):
            raise ValueError(f"hidden_size must be a positive int or None, got {hidden_size!r}")
        self.num_layers = num_layers
        self.intermediate_size = intermediate_size
        if model_fingerprint is not None and not isinstance(model_fingerprint, str):
            raise TypeError(f"model_fingerprint must be a str or None, got {type(model_fingerprint).__name__}")
        self.model_id = model_id
        self.model_fingerprint = model_fingerprint
        self.source: Optional[str] = None
        self.hidden_size = hidden_size
        self.thresholds: Dict[str, float] = dict(thresholds or {})
        self.tokens_per_language: Dict[str, int] = {str(k): int(v) for k, v in (tokens_per_language or {}).items()}
        self.notes: List[str] = list(notes or [])
        self._sets: Dict[str, PerLayer] = {}
        check_languages(list(neurons))
        for lang, layers in neurons.items():
            if isinstance(layers, (torch.Tensor, str)) or not isinstance(layers, Sequence):
                raise TypeError(f"neurons[{lang!r}] must be a sequence with one index tensor per layer, "
                                f"got {type(layers).__name__}")
            if len(layers) != num_layers:
                raise ValueError(f"neurons[{lang!r}] has {len(layers)} layers, expected num_layers={num_layers}")
            per_layer = []
            unsorted_layers = []
            for li, values in enumerate(layers):
                t, was_sorted = check_layer_indices(values, f"neurons[{lang!r}][layer {li}]", intermediate_size)
                if not was_sorted:
                    unsorted_layers.append(li)
                per_layer.append(t)
            if unsorted_layers:
                self.notes.append(f"{lang}: indices of layers {unsorted_layers} were not sorted; sorted on load")
            self._sets[lang] = per_layer
        self._experts: Dict[str, PerExpert] = {}
        if experts is not None:
            if not isinstance(experts, Mapping) or list(experts) != list(neurons):
                raise ValueError(f"experts must map the same languages as neurons, in the same order "
                                 f"({list(neurons)}), got {list(experts) if isinstance(experts, Mapping) else type(experts).__name__}")
            for lang, per_moe in experts.items():
                self._experts[lang], unsorted = check_expert_indices(per_moe, f"experts[{lang!r}]", self.expert_layout)
                if unsorted:
                    self.notes.append(f"{lang}: expert indices of (moe layer, expert) {unsorted} were not sorted; sorted")

    # ------------------------------------------------------------------ access
    @property
    def languages(self) -> List[str]:
        return list(self._sets)

    def __len__(self) -> int:
        return len(self._sets)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sets)

    def __contains__(self, lang: object) -> bool:
        return lang in self._sets

    def _get(self, lang: str) -> PerLayer:
        try:
            return self._sets[lang]
        except (KeyError, TypeError):
            raise KeyError(f"language {lang!r} not in this NeuronSet (languages: {self.languages})") from None

    def __getitem__(self, lang: str) -> PerLayer:
        """Per-layer sorted int64 CPU tensors (copies: the set cannot be changed through them)."""
        return [t.clone() for t in self._get(lang)]

    def select(self, lang: str, device: Union[str, torch.device, None] = None) -> PerLayer:
        """Per-layer index list of the dense MLPs for ``patch``/``deactivate`` (copies, optionally
        on ``device``)."""
        return [t.to(device) if device is not None else t.clone() for t in self._get(lang)]

    def layer_counts(self, lang: str) -> List[int]:
        """Neurons per dense MLP layer (expert neurons: ``expert_counts``)."""
        return [int(t.numel()) for t in self._get(lang)]

    def total(self, lang: str) -> int:
        """All of ``lang``'s neurons: the dense MLPs' and the experts'."""
        return sum(self.layer_counts(lang)) + (int(self.expert_counts(lang).sum()) if self.has_experts else 0)

    # ---------------------------------------------------------- expert neurons
    @property
    def has_experts(self) -> bool:
        """Whether the set holds expert neurons (made for a mixture-of-experts model)."""
        return self.expert_layout is not None

    @property
    def expert_layers(self) -> Tuple[int, ...]:
        """Decoder-layer indices of the MoE layers (``()`` for a dense set)."""
        return () if self.expert_layout is None else self.expert_layout.layers

    @property
    def experts(self) -> Dict[str, PerExpert]:
        """``{language: [[indices of expert e of MoE layer m] for e] for m]}`` (copies; ``{}`` for a
        dense set)."""
        return {lang: [[t.clone() for t in row] for row in per] for lang, per in self._experts.items()}

    def select_experts(self, lang: str, device: Union[str, torch.device, None] = None) -> PerExpert:
        """``lang``'s expert neurons, a list over MoE layers of lists over experts of sorted int64
        tensors, for ``patch(expert_neurons=...)`` / ``deactivate(expert_neurons=...)``."""
        self._get(lang)
        if not self.has_experts:
            raise ValueError("this neuron set has no expert neurons (made for a dense model)")
        return [[t.to(device) if device is not None else t.clone() for t in row] for row in self._experts[lang]]

    def expert_counts(self, lang: str) -> torch.Tensor:
        """int64 ``[MoE layers, experts]``: ``lang``'s neurons per expert (the heat map's values)."""
        self._get(lang)
        if not self.has_experts:
            raise ValueError("this neuron set has no expert neurons (made for a dense model)")
        return torch.tensor([[t.numel() for t in row] for row in self._experts[lang]], dtype=torch.int64)

    @property
    def num_units(self) -> Optional[int]:
        """Neurons the set chooses from: dense ``num_layers * intermediate_size`` plus
        ``MoE layers * experts * expert intermediate`` (None when ``intermediate_size`` is unknown)."""
        if self.intermediate_size is None:
            return None
        lay = self.expert_layout
        return self.num_layers * self.intermediate_size + (0 if lay is None else
                                                           len(lay.layers) * lay.num_experts * lay.intermediate_size)

    def __eq__(self, other: object) -> bool:
        """Same languages (in order), shape and indices; metadata is not compared."""
        if not isinstance(other, NeuronSet):
            return NotImplemented
        return (
            self.languages == other.languages
            and self.num_layers == other.num_layers
            and self.intermediate_size == other.intermediate_size
            and self.expert_layout == other.expert_layout
            and all(torch.equal(a, b) for lang in self._sets for a, b in zip(self._sets[lang], other._sets[lang]))
            and all(torch.equal(a, b) for lang in self._experts
                    for ra, rb in zip(self._experts[lang], other._experts[lang]) for a, b in zip(ra, rb))
        )

    __hash__ = None  # mutable metadata; not hashable

    def __repr__(self) -> str:
        totals = ", ".join(f"{lang}={self.total(lang)}" for lang in self._sets)
        lay = self.expert_layout
        moe = "" if lay is None else (f", moe_layers={list(lay.layers)}, num_experts={lay.num_experts}, "
                                      f"expert_intermediate_size={lay.intermediate_size}")
        return (f"NeuronSet(num_layers={self.num_layers}, intermediate_size={self.intermediate_size}{moe}, "
                f"model_id={self.model_id!r}, totals: {totals})")

    # ---------------------------------------------------------------- set ops
    def _langs(self, langs: Union[str, Iterable[str]]) -> List[str]:
        langs = [langs] if isinstance(langs, str) else list(langs)
        if not langs:
            raise ValueError("need at least one language")
        for lang in langs:
            self._get(lang)
        return langs

    def union(self, langs: Union[str, Iterable[str]]) -> PerLayer:
        """Per dense layer, the neurons selected for any of ``langs`` (sorted, unique)."""
        langs = self._langs(langs)
        out = []
        for li in range(self.num_layers):
            out.append(torch.unique(torch.cat([self._sets[lang][li] for lang in langs]), sorted=True))
        return out

    def intersection(self, langs: Union[str, Iterable[str]]) -> PerLayer:
        """Per dense layer, the neurons selected for every one of ``langs`` (sorted)."""
        langs = self._langs(langs)
        out = []
        for li in range(self.num_layers):
            acc = self._sets[langs[0]][li]
            for lang in langs[1:]:
                acc = acc[torch.isin(acc, self._sets[lang][li])]
            out.append(acc.clone())
        return out

    def overlap(self) -> torch.Tensor:
        """int64 ``[K, K]``: entry (a, b) = neurons (dense and expert) shared by languages a and b
        (diagonal = totals)."""
        langs = self.languages
        k = len(langs)
        out = torch.zeros(k, k, dtype=torch.int64)
        for a in range(k):
            for b in range(a, k):
                n = sum(int(torch.isin(x, y).sum()) for x, y in zip(self._sets[langs[a]], self._sets[langs[b]]))
                if self.has_experts:
                    n += sum(int(torch.isin(x, y).sum()) for ra, rb in zip(self._experts[langs[a]],
                                                                           self._experts[langs[b]])
                             for x, y in zip(ra, rb))
                out[a, b] = out[b, a] = n
        return out

    # ------------------------------------------------------------ parameters
    def trainable_params(self, lang: str, hidden_size: Optional[int] = None) -> int:
        """Values sparse training updates for ``lang``: a gate row, an up row and a down column
        (``hidden_size`` each) per selected neuron, i.e. ``3 * hidden * count``."""
        hidden = hidden_size if hidden_size is not None else self.hidden_size
        if hidden is None:
            raise ValueError("hidden_size unknown: pass hidden_size= (this NeuronSet has none recorded)")
        if hidden <= 0:
            raise ValueError(f"hidden_size must be positive, got {hidden}")
        return 3 * int(hidden) * self.total(lang)

    def trainable_fraction(self, lang: str, hidden_size: Optional[int], total_params: int) -> float:
        """``trainable_params / total_params`` (the paper reports this as a percentage of the model)."""
        if total_params <= 0:
            raise ValueError(f"total_params must be positive, got {total_params}")
        return self.trainable_params(lang, hidden_size) / total_params

    def random_like(self, lang: str, seed: int, mode: str = "per_layer") -> PerLayer:
        """A random baseline the size of ``lang``'s dense set (sorted per-layer index tensors).

        ``per_layer``: the same count in each layer, drawn uniformly without replacement within
        the layer. ``total``: the same total, drawn uniformly without replacement over all
        (layer, neuron) pairs, so per-layer counts vary (the paper's random baseline).
        Deterministic for a given seed (CPU generator).
        """
        if self.intermediate_size is None:
            raise ValueError("intermediate_size unknown: pass intermediate_size= when loading a reference-format file")
        counts = self.layer_counts(lang)
        inter = self.intermediate_size
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        if mode == "per_layer":
            return [torch.sort(torch.randperm(inter, generator=gen)[:c]).values for c in counts]
        if mode == "total":
            flat = torch.sort(torch.randperm(self.num_layers * inter, generator=gen)[: sum(counts)]).values
            layer = flat // inter
            neuron = flat % inter
            return [neuron[layer == li].clone() for li in range(self.num_layers)]
        raise ValueError(f"mode must be 'per_layer' or 'total', got {mode!r}")

    def random_experts_like(self, lang: str, seed: int, mode: str = "per_layer") -> Tuple[PerLayer, PerExpert]:
        """A random baseline the size of ``lang``'s dense and expert neurons: (per-layer dense
        indices, per-(MoE layer, expert) indices). ``per_layer``: the same count per dense layer
        and per expert; ``total``: the same total over all units (``indices.random_units``)."""
        if not self.has_experts:
            raise ValueError("this neuron set has no expert neurons (made for a dense model): use random_like")
        if self.intermediate_size is None:
            raise ValueError("intermediate_size unknown")
        return random_units(self.layer_counts(lang), self.intermediate_size, self.expert_counts(lang),
                            self.expert_layout, seed, mode)

    # ------------------------------------------------------------- validation
    def validate(self, model: Any = None, *, num_layers: Optional[int] = None,
                 intermediate_size: Optional[int] = None, allow_other_model: bool = False) -> "NeuronSet":
        """Check this set fits a model: layer count, index range and, for a model (not a config),
        that it is the model the set was made for (``ModelMismatchError`` naming both, unless
        ``allow_other_model=True``: a deliberate transfer; ``transfer_to`` makes one for ``patch``).
        A set without a fingerprint (reference format, older files) is accepted.

        ``model``: a HF model or config (``num_hidden_layers`` / ``intermediate_size``, taken
        from ``text_config`` for multimodal Gemma 3), or pass the numbers. Returns ``self``.
        Indices are already known to be int64, unique and sorted (checked on construction).
        A set with expert neurons needs a model (its MLP and expert weights are read, by
        structure), and the model's MoE layers and expert shape must be the set's.
        """
        if model is not None:
            if num_layers is not None or intermediate_size is not None:
                raise ValueError("pass either a model/config or num_layers/intermediate_size, not both")
            if self.has_experts:
                num_layers, intermediate_size = self._check_experts_fit(model)
            else:
                num_layers, intermediate_size = model_shape(model)
        if num_layers is None and intermediate_size is None:
            raise ValueError("validate needs a model/config or num_layers= / intermediate_size=")
        if num_layers is not None and num_layers != self.num_layers:
            raise ValueError(f"layer count mismatch: neuron set has {self.num_layers} layers, model has {num_layers}")
        if intermediate_size is not None:
            if self.intermediate_size is not None and self.intermediate_size != intermediate_size:
                raise ValueError(f"intermediate_size mismatch: neuron set was made for {self.intermediate_size}, "
                                 f"model has {intermediate_size}")
            for lang, layers in self._sets.items():
                for li, t in enumerate(layers):
                    check_layer_indices(t, f"{lang} layer {li}", intermediate_size)
        if isinstance(model, torch.nn.Module):
            check_model(self.model_fingerprint, self.model_id, model, self._label(),
                        allow_other_model=allow_other_model,
                        way_out="pass validate(model, allow_other_model=True), or patch with "
                                "neurons=neuron_set.transfer_to(model)")
        return self

    def _check_experts_fit(self, model: Any) -> Tuple[int, int]:
        """(dense layers, dense intermediate size) of ``model``, after checking its experts are
        laid out as this set's."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{self._label()} has expert neurons: validate it against the model (its weights are "
                            f"read), not a {type(model).__name__}")
        ex, lay = expert_shape(model), self.expert_layout
        have = None if ex is None else ExpertLayout(tuple(ex.layers), ex.num_experts, ex.intermediate_size)
        if have != lay:
            raise ValueError(f"{self._label()} has expert neurons for MoE layers {list(lay.layers)} of {lay.num_experts} "
                             f"experts of intermediate size {lay.intermediate_size}; the model has "
                             + ("no mixture-of-experts layers" if have is None else
                                f"MoE layers {list(have.layers)} of {have.num_experts} experts of intermediate size "
                                f"{have.intermediate_size}"))
        shape = mlp_shape(model)
        return shape.num_layers, shape.intermediate_size

    def _label(self) -> str:
        return f"neuron set {self.source}" if self.source else "this neuron set"

    def transfer_to(self, model: torch.nn.Module) -> "NeuronSet":
        """A copy of this set for ``model``, another model of the same shape: the explicit step of a
        deliberate transfer (e.g. base-model neurons trained on its instruct variant). The copy
        carries ``model``'s fingerprint and name and a note saying where the set came from."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"transfer_to expects a torch.nn.Module, got {type(model).__name__}")
        self.validate(model, allow_other_model=True)  # the shape must fit all the same
        target, name = model_fingerprint(model), model_name(model)
        note = (f"transferred by transfer_to from {describe_model(self.model_id, self.model_fingerprint)} "
                f"to {describe_model(name, target)}")
        copy = NeuronSet(self._sets, self.num_layers, self.intermediate_size, model_id=name,
                         hidden_size=self.hidden_size, thresholds=self.thresholds,
                         tokens_per_language=self.tokens_per_language, notes=self.notes + [note],
                         model_fingerprint=target, **self._expert_kwargs())
        copy.source = self.source
        return copy

    def _expert_kwargs(self) -> Dict[str, Any]:
        if not self.has_experts:
            return {}
        return {"experts": self._experts, "expert_layout": self.expert_layout}

    # ------------------------------------------------------------------- save
    def save(self, path: Union[str, Path], format: str = "lape") -> Path:
        """Write the set. ``format="lape"``: our format; ``path`` is a directory (created) holding
        ``neurons.safetensors`` + ``neurons.json``, or a ``*.safetensors`` file with a ``*.json``
        beside it. ``format="reference"``: the LAPE reference format, ``torch.save`` of
        ``list[language][layer]`` int64 tensors (names and metadata are lost; dense sets only: the
        format has no experts). Returns the path written (directory, safetensors file, or
        reference file). A set with expert neurons adds ``experts.indices.{k}`` /
        ``experts.offsets.{k}`` (offsets over MoE layer x expert, layer-major) and the JSON
        ``experts`` layout, as format version 2."""
        path = Path(path)
        if format == "reference" and self.has_experts:
            raise ValueError(f"the LAPE reference format (list[language][layer]) has no expert neurons; this set has "
                             f"{sum(int(self.expert_counts(l).sum()) for l in self._sets)} in MoE layers "
                             f"{list(self.expert_layers)}: save it with format='lape'")
        if format == "reference":
            path.parent.mkdir(parents=True, exist_ok=True)
            # clone: a view would drag its whole storage into the file
            torch.save([[t.clone() for t in self._sets[lang]] for lang in self._sets], path)
            return path
        if format != "lape":
            raise ValueError(f"format must be 'lape' or 'reference', got {format!r}")
        from safetensors.torch import save_file

        tensors_path, json_path = _pair_paths(path, for_writing=True)
        tensors: Dict[str, torch.Tensor] = {}
        for k, lang in enumerate(self._sets):
            layers = self._sets[lang]
            counts = torch.tensor([0] + [t.numel() for t in layers], dtype=torch.int64)
            tensors[f"indices.{k}"] = torch.cat(layers or [torch.empty(0, dtype=torch.int64)]).contiguous()
            tensors[f"offsets.{k}"] = torch.cumsum(counts, 0)
            if self.has_experts:
                tensors.update(expert_tensors(k, self._experts[lang]))
        version = FORMAT_VERSION_EXPERTS if self.has_experts else FORMAT_VERSION
        save_file(tensors, str(tensors_path), metadata={"format": FORMAT_NAME, "format_version": str(version)})
        meta = {
            "format": FORMAT_NAME,
            "format_version": version,
            "languages": self.languages,
            "num_layers": self.num_layers,
            "intermediate_size": self.intermediate_size,
            "model_id": self.model_id,
            "model_fingerprint": self.model_fingerprint,
            "hidden_size": self.hidden_size,
            "thresholds": self.thresholds,
            "tokens_per_language": self.tokens_per_language,
            "totals": {lang: self.total(lang) for lang in self._sets},
            "notes": self.notes,
            "tensors": tensors_path.name,
        }
        if self.has_experts:
            meta["experts"] = self.expert_layout.to_json()
        json_path.write_text(json.dumps(meta, indent=2) + "\n")
        return path

    # ------------------------------------------------------------------- load
    @classmethod
    def load(cls, path: Union[str, Path], languages: Optional[Sequence[str]] = None, *,
             intermediate_size: Optional[int] = None, model_id: Optional[str] = None) -> "NeuronSet":
        """Read our format (a directory with ``neurons.json``, or a ``.json``/``.safetensors``
        file of a pair) or the LAPE reference format (``torch.save`` of ``list[lang][layer]``).

        Reference files are read with ``torch.load(weights_only=True)``: arbitrary pickled objects
        are refused. They carry no names: ``languages`` names them in file order (default
        ``lang0``, ``lang1``, ...). The reference script drops trailing languages that got no
        neurons, so ``languages`` may be longer than the file: the missing trailing languages get
        empty sets (recorded in ``notes``). ``intermediate_size`` is not stored in reference
        files; pass it to enable range checks and ``random_like``. ``model_id`` names the model
        of a reference file; for our format it must agree with the recorded one.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no neuron set at {path}")
        if path.is_dir() or path.suffix in (".json", ".safetensors"):
            ns = cls._load_lape(path)
            ns.source = str(path)
            if model_id is not None:
                if ns.model_id not in (None, model_id):
                    raise ValueError(f"{path} was made for model {ns.model_id!r}, not {model_id!r}")
                ns.model_id = model_id
            if languages is not None and list(languages) != ns.languages:
                raise ValueError(f"languages {list(languages)} do not match the file's {ns.languages}")
            if intermediate_size is not None:
                ns.validate(intermediate_size=intermediate_size)
            return ns
        sets, num_layers, notes = read_reference(path, languages)
        try:
            ns = cls(sets, num_layers, intermediate_size, model_id=model_id, notes=notes)
        except (TypeError, ValueError) as exc:
            raise NeuronSetFormatError(f"{path}: {exc}") from None
        ns.source = str(path)
        ns.notes.append(unknown_note(f"neuron set {path}", "the LAPE reference format carries none"))
        return ns

    @classmethod
    def _load_lape(cls, path: Path) -> "NeuronSet":
        tensors_path, json_path = _pair_paths(path, for_writing=False)
        try:
            meta = json.loads(json_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise NeuronSetFormatError(f"{json_path}: cannot read neuron-set JSON: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise NeuronSetFormatError(f"{json_path}: not a lape_kernels neuron set (format != {FORMAT_NAME!r})")
        version = meta.get("format_version")
        if version not in (FORMAT_VERSION, FORMAT_VERSION_EXPERTS):
            raise NeuronSetFormatError(f"{json_path}: format_version {version!r} not supported "
                                       f"(this code reads {FORMAT_VERSION} and {FORMAT_VERSION_EXPERTS})")
        layout = None
        if version == FORMAT_VERSION_EXPERTS or "experts" in meta:
            try:
                layout = layout_of(meta.get("experts"), "'experts'")
            except (TypeError, ValueError) as exc:
                raise NeuronSetFormatError(f"{json_path}: {exc}") from None
        for key in ("languages", "num_layers", "intermediate_size"):
            if key not in meta:
                raise NeuronSetFormatError(f"{json_path}: missing key {key!r}")
        languages = meta["languages"]
        if not isinstance(languages, list) or len(set(map(str, languages))) != len(languages):
            raise NeuronSetFormatError(f"{json_path}: 'languages' must be a list of unique names")
        num_layers = meta["num_layers"]
        if not tensors_path.exists():
            raise NeuronSetFormatError(f"{json_path}: tensor file {tensors_path} missing")
        sets: Dict[str, PerLayer] = {}
        experts: Dict[str, PerExpert] = {}
        try:
            with open_safetensors(tensors_path, NeuronSetFormatError) as fh:
                keys = set(fh.keys())
                for k, lang in enumerate(languages):
                    sets[str(lang)] = read_offset_table(fh.get_tensor, keys, f"indices.{k}", f"offsets.{k}", num_layers,
                                                        "num_layers", lang, str(tensors_path), NeuronSetFormatError)
                    if layout is not None:
                        experts[str(lang)] = read_expert_tensors(fh.get_tensor, keys, k, lang, layout, str(tensors_path),
                                                                 NeuronSetFormatError)
        except NeuronSetFormatError:
            raise
        except Exception as exc:
            raise NeuronSetFormatError(f"{tensors_path}: malformed neuron-set tensors: {type(exc).__name__}: "
                                       f"{' '.join(str(exc).split())}") from None
        notes = meta.get("notes")
        if "model_fingerprint" not in meta and isinstance(notes, list):  # a file written before fingerprints
            notes = notes + [unknown_note("this neuron set", "written before lape_kernels recorded one")]
        try:
            return cls(
                sets, num_layers, meta["intermediate_size"],
                model_id=meta.get("model_id"), hidden_size=meta.get("hidden_size"),
                thresholds=meta.get("thresholds"), tokens_per_language=meta.get("tokens_per_language"),
                notes=notes, model_fingerprint=meta.get("model_fingerprint"),
                **({} if layout is None else {"experts": experts, "expert_layout": layout}),
            )
        except (TypeError, ValueError) as exc:
            raise NeuronSetFormatError(f"{path}: {exc}") from None


def _pair_paths(path: Path, for_writing: bool) -> Tuple[Path, Path]:
    """(safetensors, json) paths for a directory or either file of a pair."""
    if for_writing and path.suffix in (".safetensors", ".json"):
        path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    if path.suffix == ".json":
        if not for_writing and path.exists():
            try:
                name = json.loads(path.read_text()).get("tensors")
            except (OSError, json.JSONDecodeError, AttributeError):
                name = None
            # the name recorded at save time, unless the pair was renamed since
            if isinstance(name, str) and "/" not in name and "\\" not in name and (path.parent / name).exists():
                return path.parent / name, path
        return path.with_suffix(".safetensors"), path
    if for_writing:
        path.mkdir(parents=True, exist_ok=True)
    elif not (path / _JSON_NAME).exists():
        raise NeuronSetFormatError(f"{path}: directory has no {_JSON_NAME}")
    return path / _TENSORS_NAME, path / _JSON_NAME
