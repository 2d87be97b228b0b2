"""The settings of each experiment command, as dataclasses that drive the command line and save
and load themselves (PEFT's config pattern).

Why: a setting is written once, here, with its default, its help text and its check. The
``lape-kernels`` options are generated from the fields (``add_options``), a parsed command line
becomes a config without naming a field (``from_args``), and the demo hands configs to the
functions directly (no argument strings parsed back). A new setting is one new field.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Type, TypeVar, Union

from .errors import ExperimentError

__all__ = ["METHODS", "DEFAULT_LR", "DISTRIBUTED", "CONFIG_FORMAT", "setting", "positive_int", "rate", "add_options",
           "from_args", "Config", "CollectConfig", "IdentifyConfig", "FinetuneConfig", "EvalConfig", "DemoConfig"]

METHODS = ("neurons", "random", "ffn", "full", "lora")
DEFAULT_LR = {"neurons": 1e-4, "random": 1e-4, "lora": 1e-4, "ffn": 1e-5, "full": 1e-5}
CONFIG_FORMAT = "lape_kernels.config"

# settings that do not change a fine-tuning result (left out of the resume/identity hash)
# (recompute: bit-identical training, only memory and time differ; tested)
# (allow_other_model: permits a transfer; the model's fingerprint is among the run's recorded inputs)
# (grad_accum, distributed: how the same global batch is split over micro-batches and processes;
#  equal to fp32 rounding, tested; a different world size is not a setting either)
_NOT_HASHED = ("out", "stop_after_steps", "overwrite", "cache_dir", "save_every", "quiet", "recompute",
               "allow_other_model", "grad_accum", "distributed")
DISTRIBUTED = ("ddp", "fsdp2")

C = TypeVar("C", bound="Config")


# ----------------------------------------------------------------------------- argument types
def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not (0.0 < v <= 1.0):
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {v}")
    return v


# ----------------------------------------------------------------------------- fields -> argparse
def setting(default: Any = MISSING, *, help: str, flags: Optional[tuple] = None, type: Any = None,
            choices: Optional[tuple] = None, metavar: Optional[str] = None, group: Optional[str] = None,
            positional: bool = False, cli: bool = True) -> Any:
    """A config field with its command-line option. ``default`` MISSING: a required option.

    ``flags``: the option strings (default ``--field-name``); ``type``: the argparse converter
    (default: from the annotation); ``group``: fields of one required mutually exclusive group;
    ``cli=False``: a setting only the Python interface offers."""
    meta = {"help": help, "flags": flags, "type": type, "choices": choices, "metavar": metavar, "group": group,
            "positional": positional, "cli": cli}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return MISSING


def _base_type(hint: Any) -> Any:
    """(element type, is a list) of ``Optional[List[str]]``, ``int``, ..."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is Union and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) in (list, List):
        return typing.get_args(hint)[0], True
    return hint, False


def add_options(parser: argparse.ArgumentParser, cls: Type["Config"]) -> argparse.ArgumentParser:
    """One option per field of ``cls`` (its default, help, type, choices) on ``parser``."""
    hints = typing.get_type_hints(cls)
    groups: Dict[str, Any] = {}
    for f in fields(cls):
        meta = f.metadata
        if not meta.get("cli", False):
            continue
        default = _default(f)
        base, many = _base_type(hints[f.name])
        shown = default is not MISSING and default is not None and base is not bool and "default" not in meta["help"]
        kwargs: Dict[str, Any] = {"help": meta["help"] + (" (default: %(default)s)" if shown else "")}
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        if many:
            kwargs["nargs"] = "+"
        if base is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = meta["type"] or base
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
        if meta["positional"]:
            parser.add_argument(f.name, **kwargs)
            continue
        kwargs["dest"] = f.name
        target: Any = parser
        if meta["group"]:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group(required=True)
            target = groups[meta["group"]]
        elif default is MISSING:
            kwargs["required"] = True
        if default is not MISSING:
            kwargs["default"] = default
        target.add_argument(*(meta["flags"] or ("--" + f.name.replace("_", "-"),)), **kwargs)
    return parser


def from_args(cls: Type[C], args: argparse.Namespace) -> C:
    """The config of parsed arguments: every field the command line offers, by name."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


class Config:
    """Save, load and compare a settings dataclass (JSON, every field by name)."""

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: Type[C], values: Mapping[str, Any], where: str = "config") -> C:
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - names)
        if unknown:
            raise ExperimentError(f"{where}: unknown settings {unknown} for {cls.__name__}; known: {sorted(names)}")
        try:
            return cls(**values)
        except TypeError as exc:
            raise ExperimentError(f"{where}: {exc}") from None

    def save(self, path: Union[str, Path]) -> Path:
        from .outputs import write_json_atomic

        return write_json_atomic(path, {"format": CONFIG_FORMAT, "kind": type(self).__name__,
                                        "config": self.to_dict()})

    @classmethod
    def load(cls: Type[C], path: Union[str, Path]) -> C:
        from .outputs import read_json

        blob = read_json(path)
        if not isinstance(blob, dict) or blob.get("format") != CONFIG_FORMAT or not isinstance(blob.get("config"), dict):
            raise ExperimentError(f"{path}: not a lape_kernels config file")
        if blob.get("kind") != cls.__name__:
            raise ExperimentError(f"{path}: holds a {blob.get('kind')}, not a {cls.__name__}")
        return cls.from_dict(blob["config"], where=str(path))


# ----------------------------------------------------------------------------- shared settings
def _model(required: bool = True) -> Any:
    return setting(MISSING if required else None,
                   help="model alias (gemma3-270m, smollm2-135m), local path or HF id"
                        + ("" if required else " (default: gemma3-270m)"))


def _data() -> Any:
    return setting(None, help="corpus: 'builtin' (default; the offline corpus lape_kernels builds) or a dataset "
                              "path/spec")


def _device() -> Any:
    return setting("auto", help="auto (CUDA if available), cpu, cuda, cuda:N")


def _dtype() -> Any:
    return setting("auto", help="weights: auto (collect: float32 on CPU, bfloat16 on CUDA; finetune/eval: "
                                "float32), float32, bfloat16, float16")


def _cache_dir() -> Any:
    return setting(None, help="where converted models / the built corpus are cached")


def _allow_other_model(what: str) -> Any:
    return setting(False, help=f"a deliberate transfer: accept that {what} another model than --model "
                               f"(another fingerprint, e.g. the base model of an instruct variant)")


def _quiet() -> Any:
    return setting(False, help="no messages on stderr (the Python interface's; the CLI reports)", cli=False)


# ----------------------------------------------------------------------------- commands
@dataclass
class CollectConfig(Config):
    """``lape-kernels collect``: per-language LAPE activation statistics."""

    model: str = _model()
    languages: List[str] = setting(help="languages to collect (corpus names)", metavar="LANG")
    out: str = setting(help="the statistics directory to write", flags=("-o", "--out"), metavar="STATS_DIR")
    data: Optional[str] = _data()
    tokens: int = setting(100_000, type=positive_int, help="tokens per language (packed; default 100000)")
    seq_len: int = setting(512, type=positive_int, help="tokens per packed sequence")
    batch_size: int = setting(8, type=positive_int, help="sequences per forward pass")
    device: str = _device()
    dtype: str = _dtype()
    save_every: int = setting(20, type=positive_int, help="save resumable state every N batches")
    cache_dir: Optional[str] = _cache_dir()
    overwrite: bool = setting(False, help="replace an existing output")
    quiet: bool = _quiet()


@dataclass
class IdentifyConfig(Config):
    """``lape-kernels identify``: LAPE language neurons from collected statistics."""

    stats: List[str] = setting(help="collect output directories or stats files", metavar="STATS", positional=True)
    out: str = setting(help="where to write the neuron set", flags=("-o", "--out"), metavar="NEURONS")
    languages: Optional[List[str]] = setting(None, help="use (and order) these languages", metavar="LANG")
    top_rate: float = setting(0.01, type=rate, help="fraction of all neurons kept as language-specific")
    filter_rate: float = setting(0.95, type=rate, help="activation-probability quantile a neuron must pass in "
                                                       "some language")
    activation_bar_ratio: float = setting(0.95, type=rate, help="quantile of the activation bar")
    format: str = setting("lape", choices=("lape", "reference"),
                          help="lape: directory (or .json/.safetensors pair) with names and metadata; "
                               "reference: the LAPE reference's torch.save list[lang][layer]")
    overwrite: bool = setting(False, help="replace an existing output")


@dataclass
class FinetuneConfig(Config):
    """All settings of one run; defaults follow the paper (AdamW, wd 0.01, clip 1.0, 512-token
    packed sequences, lr 1e-4 for neurons/random/LoRA and 1e-5 for full/FFN)."""

    model: str = _model()
    language: str = setting(help="the language to train")
    method: str = setting(choices=METHODS, help="what trains: the language's neurons, a random set of the same "
                                                "size, the MLPs (ffn), every weight (full) or LoRA adapters")
    out: str = setting(help="the run directory to write", flags=("-o", "--out"), metavar="RUN_DIR")
    data: Optional[str] = _data()
    neurons: Optional[str] = setting(None, help="neuron set (for --method neurons / random)")
    neuron_languages: Optional[List[str]] = setting(None, metavar="LANG",
                                                    help="names of the languages of a LAPE reference-format neuron "
                                                         "file, in file order")
    tokens: Optional[int] = setting(None, type=positive_int, group="budget",
                                    help="training tokens (rounded up to whole steps)")
    steps: Optional[int] = setting(None, type=positive_int, group="budget", help="optimizer steps")
    lr: Optional[float] = setting(None, help="default: 1e-4 neurons/random/lora, 1e-5 full/ffn")
    weight_decay: float = setting(0.01, help="AdamW weight decay")
    grad_clip: float = setting(1.0, help="max gradient norm (0 = off)")
    warmup_steps: int = setting(0, help="linear learning-rate warmup steps")
    seq_len: int = setting(512, type=positive_int, help="tokens per packed sequence")
    batch_size: int = setting(4, type=positive_int, help="sequences per step: the global batch, split evenly over the "
                                                        "processes of a torchrun launch")
    grad_accum: int = setting(1, type=positive_int, metavar="N",
                              help="each process's share of the batch in N micro-batches, gradients accumulated "
                                   "(the same step, less memory)")
    distributed: str = setting("ddp", choices=DISTRIBUTED,
                               help="under torchrun: ddp (every process holds the model) or fsdp2 (fully_shard per "
                                    "decoder layer and the root: weights, gradients and optimizer state sharded)")
    lora_r: int = setting(32, type=positive_int, help="LoRA rank")
    lora_alpha: int = setting(64, type=positive_int, help="LoRA alpha")
    lora_dropout: float = setting(0.05, help="LoRA dropout")
    eval_every: int = setting(50, type=positive_int, help="validate every N steps (and at the end)")
    eval_at_start: bool = setting(False, help="also validate before the first step")
    val_tokens: int = setting(16384, type=positive_int, help="validation tokens")
    eval_batch_size: Optional[int] = setting(None, type=positive_int,
                                            help="validation sequences per forward pass and process (default: the "
                                                 "training micro-batch, --batch-size / processes / --grad-accum)")
    save_every: Optional[int] = setting(None, help="checkpoint every N steps (default: --eval-every; 0 = off)")
    seed: int = setting(0, help="seed of the data order, the random neuron set and the initialisation")
    device: str = _device()
    dtype: str = _dtype()
    autocast: str = setting("auto", help="bf16/fp16 matmuls over float32 weights: auto (bf16 on CUDA, none on CPU), "
                                         "none, bf16, fp16")
    cache_dir: Optional[str] = _cache_dir()
    stop_after_steps: Optional[int] = setting(None, type=positive_int,
                                              help="checkpoint and stop after N steps (exit 3); rerunning resumes "
                                                   "(simulates an interruption)")
    overwrite: bool = setting(False, help="replace an existing output")
    allow_other_model: bool = _allow_other_model("--neurons were identified on")
    quiet: bool = _quiet()
    recompute: str = setting("none", choices=("none", "up", "gate_up"),
                             help="neurons/random: recompute these MLP projections in backward instead of keeping "
                                  "them (less memory, one or two more GEMMs per layer; same results)")

    def check(self) -> None:
        if self.method not in METHODS:
            raise ExperimentError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.method in ("neurons", "random") and not self.neurons:
            raise ExperimentError(f"--method {self.method} needs --neurons (a neuron set from `lape-kernels identify`)")
        if self.tokens is None and self.steps is None:
            raise ExperimentError("give a budget: --tokens N or --steps N")
        if self.tokens is not None and self.steps is not None:
            raise ExperimentError("give either --tokens or --steps, not both")
        for name in ("tokens", "steps"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ExperimentError(f"--{name} must be positive, got {v}")
        if self.distributed not in DISTRIBUTED:
            raise ExperimentError(f"--distributed must be one of {', '.join(DISTRIBUTED)}, got {self.distributed!r}")
        for name in ("seq_len", "batch_size", "grad_accum", "eval_every", "val_tokens", "lora_r", "lora_alpha"):
            if getattr(self, name) <= 0:
                raise ExperimentError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ExperimentError(f"--seq-len must be >= 2, got {self.seq_len}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ExperimentError(f"--lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ExperimentError("--weight-decay, --grad-clip and --warmup-steps must be >= 0")
        if not (0 <= self.lora_dropout < 1):
            raise ExperimentError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        from ..training.sparse_mlp import RECOMPUTE_MODES

        if self.recompute not in RECOMPUTE_MODES:
            raise ExperimentError(f"--recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {self.recompute!r}")
        if self.recompute != "none" and self.method not in ("neurons", "random"):
            raise ExperimentError(f"--recompute applies to --method neurons/random (sparse training), not {self.method}")
        if self.stop_after_steps is not None and self.stop_after_steps <= 0:
            raise ExperimentError(f"--stop-after-steps must be positive, got {self.stop_after_steps}")
        if self.save_every is not None and self.save_every < 0:
            raise ExperimentError(f"--save-every must be >= 0, got {self.save_every}")

    @property
    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.method]

    def identity(self) -> Dict[str, Any]:
        """The settings that determine the result (hashed: the same hash, the same run)."""
        d = dataclasses.asdict(self)
        for k in _NOT_HASHED:
            d.pop(k, None)
        d["lr"] = self.learning_rate
        return d


@dataclass
class EvalConfig(Config):
    """``lape-kernels eval``: before/after perplexity, alignment and update norms of a run."""

    model: str = _model()
    languages: List[str] = setting(help="languages to measure", metavar="LANG")
    target: str = setting(help="the language the run trained")
    out: str = setting(help="where to write the evaluation", flags=("-o", "--out"), metavar="EVAL_JSON")
    run: Optional[str] = setting(None, metavar="RUN_DIR", help="a finetune output (omit: the base model only)")
    data: Optional[str] = _data()
    seq_len: int = setting(512, type=positive_int, help="tokens per packed sequence")
    val_tokens: int = setting(8192, type=positive_int, help="validation tokens per language")
    batch_size: int = setting(4, type=positive_int, help="sequences per forward pass")
    parallel_n: int = setting(32, flags=("--parallel",), help="parallel sentence pairs for alignment (0 = skip)")
    align_with: str = setting("en", help="the language the target's sentences are aligned with")
    device: str = _device()
    dtype: str = _dtype()
    autocast: str = setting("none", help="none (default: float32, so small updates stay visible), bf16, fp16")
    cache_dir: Optional[str] = _cache_dir()
    overwrite: bool = setting(False, help="replace an existing output")
    allow_other_model: bool = _allow_other_model("--run was trained on")
    quiet: bool = _quiet()

    def evaluator_settings(self) -> Dict[str, Any]:
        """The ``Evaluator`` keywords (everything but what to evaluate and where to write it)."""
        d = self.to_dict()
        for k in ("model", "data", "languages", "target", "run", "out", "overwrite", "allow_other_model"):
            d.pop(k)
        return d


@dataclass
class DemoConfig(Config):
    """``lape-kernels demo``: the experiment end to end, with a report (budgets: ``demo.QUICK``)."""

    full: bool = setting(False, help="all five methods and larger budgets")
    model: Optional[str] = _model(required=False)
    data: Optional[str] = _data()
    out: str = setting("reports/demo", help="the report directory (each stage's output is kept under it)")
    target: Optional[str] = setting(None, help="target language (default: the first under-resourced one with "
                                               "enough text)")
    languages: Optional[List[str]] = setting(None, metavar="LANG", help="languages (default: the budget's)")
    methods: Optional[List[str]] = setting(None, choices=METHODS, help="methods (default: the budget's)")
    device: str = _device()
    cache_dir: Optional[str] = _cache_dir()
    fresh: bool = setting(False, help="ignore results of an earlier demo in --out")
    config_path: Optional[str] = setting(None, flags=("--config",),
                                         help="JSON file overriding budget settings (see lape_kernels.experiment.demo)")
