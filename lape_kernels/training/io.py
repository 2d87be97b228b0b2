"""Save / load / merge trained neurons, in the shape of a PEFT adapter.

``save_neurons(model, dir)`` writes only the trained slices (``lape_neurons.safetensors``) and a
small ``lape_config.json``: kilobytes to megabytes, like a LoRA adapter. ``load_neurons`` puts
them onto a fresh copy of the base model (patched, trainable again); ``merge`` writes them into
the base weights and unpatches, leaving a plain HF model for ``save_pretrained``.

The config records the base model's fingerprint (``lape_kernels.fingerprint``; the trainable
slices are not part of it), and ``load_neurons`` refuses another base model unless told
``allow_other_model=True``. Directories saved before fingerprints existed load as before, with
a note saying their model is unknown.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Union

import torch
from torch import nn

from .. import patching
from ..dtypes import FLOAT_DTYPES, dtype_name
from ..files import load_safetensors
from ..fingerprint import check_model, model_fingerprint, unknown_note
from ..introspection import expert_shape, mlp_shape, text_config
from ..neurons.neuron_set import check_layer_indices
from .loss import install_chunked_loss
from ..wrappers import unwrap
from .sparse_experts import split_flat_index
from .sparse_mlp import INDEX_NAME, PARAM_NAMES, check_can_add_parameters, has_trainable_neurons, set_trainable_neurons

__all__ = ["save_neurons", "load_neurons", "merge", "NeuronFileError", "WEIGHTS_NAME", "CONFIG_NAME", "FORMAT_VERSION"]

WEIGHTS_NAME = "lape_neurons.safetensors"
CONFIG_NAME = "lape_config.json"
FORMAT = "lape_neurons"
FORMAT_VERSION = 1
#: directories with expert slices are written as version 2: a reader of version 1 only refuses them
#: (it would otherwise load the dense slices and report the expert ones as unexpected tensors)
FORMAT_VERSION_EXPERTS = 2

_KEYS = {"index": INDEX_NAME, "gate_rows": PARAM_NAMES[0], "up_rows": PARAM_NAMES[1], "down_cols": PARAM_NAMES[2]}


class NeuronFileError(ValueError):
    """A saved neuron directory is malformed or does not fit the model."""


def _require_trained(model: nn.Module, what: str) -> None:
    if not patching.is_patched(model) or not has_trainable_neurons(model):
        raise RuntimeError(f"{what}: the model has no trainable neurons (use lape_kernels.patch(model, neurons=...))")


def _model_info(model: nn.Module) -> Dict[str, Any]:
    """What a saved-neurons directory records about its model (and is checked on load)."""
    cfg = text_config(model)
    return {
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        **mlp_shape(model)._asdict(),
        "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None) or None,
    }


def save_neurons(model: nn.Module, path: Union[str, Path]) -> Path:
    """Write the trained neuron slices of ``model`` to directory ``path`` (created). Returns it."""
    from safetensors.torch import save_file

    model = unwrap(model)  # PEFT, DDP, torch.compile, ...: the HF model inside
    _require_trained(model, "save_neurons")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    info = _model_info(model)
    tensors: Dict[str, torch.Tensor] = {}
    counts: List[int] = []
    dtype = None
    for li, mlp in enumerate(patching.patched_mlps(model)):
        if mlp._lape.sparse is None:
            counts.append(0)
            continue
        counts.append(int(getattr(mlp, INDEX_NAME).numel()))
        for key, attr in _KEYS.items():
            t = getattr(mlp, attr).detach()
            tensors[f"layers.{li}.{key}"] = t.to("cpu").contiguous()
        dtype = getattr(mlp, PARAM_NAMES[0]).dtype
    experts_config, expert_total = None, 0
    shape = expert_shape(model)
    if shape is not None:
        expert_counts = []
        for m, experts in enumerate(patching.patched_experts(model)):
            if experts._lape.sparse is None:
                expert_counts.append([0] * shape.num_experts)
                continue
            starts = experts._lape.sparse.starts
            expert_counts.append([b - a for a, b in zip(starts[:-1], starts[1:])])
            for key, attr in _KEYS.items():
                tensors[f"experts.{m}.{key}"] = getattr(experts, attr).detach().to("cpu").contiguous()
            dtype = dtype or getattr(experts, PARAM_NAMES[0]).dtype
        expert_total = sum(map(sum, expert_counts))
        experts_config = {**{k: (list(v) if k == "layers" else v) for k, v in shape._asdict().items()},
                          "counts": expert_counts}
    if dtype is None:
        dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if experts_config is None else FORMAT_VERSION_EXPERTS,
        **info,
        "model_fingerprint": model_fingerprint(model),
        "dtype": dtype_name(dtype),
        "counts": counts,
        "total_neurons": sum(counts) + expert_total,
        "language": model._lape_sparse.get("language"),
    }
    if experts_config is not None:
        config["experts"] = experts_config
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": FORMAT, "format_version": str(config["format_version"])})
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return path


def _read(path: Path):
    cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory written by save_neurons")
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NeuronFileError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise NeuronFileError(f"{cfg_path}: not a lape_neurons config (format={config.get('format') if isinstance(config, dict) else None!r})")
    if config.get("format_version") not in (FORMAT_VERSION, FORMAT_VERSION_EXPERTS):
        raise NeuronFileError(f"{cfg_path}: format_version {config.get('format_version')!r}, this version reads "
                              f"{FORMAT_VERSION} and {FORMAT_VERSION_EXPERTS} (expert neurons)")
    if (config.get("format_version") == FORMAT_VERSION_EXPERTS) != ("experts" in config):
        raise NeuronFileError(f"{cfg_path}: format_version {config['format_version']} "
                              f"{'with' if 'experts' in config else 'without'} an 'experts' entry "
                              f"(expert slices are format_version {FORMAT_VERSION_EXPERTS})")
    for key in ("model_type", "num_layers", "hidden_size", "intermediate_size", "counts", "dtype"):
        if key not in config:
            raise NeuronFileError(f"{cfg_path}: missing {key!r}")
    return config, load_safetensors(w_path, NeuronFileError)


def load_neurons(model: nn.Module, path: Union[str, Path], *, allow_other_model: bool = False) -> nn.Module:
    """Patch a fresh base ``model`` with the neurons saved at ``path`` and install their trained
    values (trainable again). Errors clearly if the file does not fit the model; a different base
    model of the same shape (another fingerprint) is a ``ModelMismatchError`` naming both, unless
    ``allow_other_model=True`` (a deliberate transfer, e.g. onto the instruct variant). What the
    check could not decide or waived is kept in ``model._lape_sparse["notes"]``. ``model`` may
    be wrapped (PEFT, ``torch.compile``; not by DDP/FSDP: load before wrapping)."""
    path = Path(path)
    check_can_add_parameters(model, "load_neurons")
    outer, model = model, unwrap(model)
    patching.check_not_recording(model, "load_neurons")
    if has_trainable_neurons(model):
        raise RuntimeError("load_neurons expects a base model without trainable neurons (merge or unpatch it first)")
    config, tensors = _read(path)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if config["model_type"] != model_type:
        raise NeuronFileError(f"{path}: neurons were trained on model_type {config['model_type']!r}, model is {model_type!r}")
    note = None
    if all(config[key] == value for key, value in mlp_shape(model)._asdict().items()):  # else _install says which
        note = check_model(config.get("model_fingerprint"), config.get("base_model_name_or_path"), model,
                           f"saved neurons {path}", allow_other_model=allow_other_model,
                           way_out="pass load_neurons(..., allow_other_model=True)")
        if "model_fingerprint" in config and config["model_fingerprint"] is None:
            note = unknown_note(f"saved neurons {path}", "the model's weights could not be read when saving")
    was_patched = patching.is_patched(model)
    try:
        patching.patch_mlps(model)
        install_chunked_loss(model)
        _install(model, path, config, tensors)
    except BaseException:
        if not was_patched:
            patching.unpatch(model)
        raise
    model._lape_sparse["notes"] = [note] if note else []
    return outer


def _expected_expert_keys(path: Path, config: Dict[str, Any], model: nn.Module) -> set:
    """The tensor names the file's expert part promises (checked against the model's experts)."""
    ex = config.get("experts")
    if ex is None:
        return set()
    shape = expert_shape(model)
    if shape is None:
        raise NeuronFileError(f"{path}: the neurons include expert neurons, the model has no mixture-of-experts layers")
    if not isinstance(ex, dict):
        raise NeuronFileError(f"{path}: 'experts' must be an object, got {type(ex).__name__}")
    want = {**shape._asdict(), "layers": list(shape.layers)}
    for key, value in want.items():
        if ex.get(key) != value:
            raise NeuronFileError(f"{path}: experts {key} mismatch: file has {ex.get(key)!r}, model has {value!r}")
    counts, M, E = ex.get("counts"), len(shape.layers), shape.num_experts
    if not (isinstance(counts, list) and len(counts) == M and all(
            isinstance(c, list) and len(c) == E and all(isinstance(n, int) and 0 <= n <= shape.intermediate_size
                                                        for n in c) for c in counts)):
        raise NeuronFileError(f"{path}: experts 'counts' must list {M} lists of {E} ints in [0, "
                              f"{shape.intermediate_size}], got {counts!r}")
    return {f"experts.{m}.{key}" for m, c in enumerate(counts) if sum(c) for key in _KEYS}


def _expert_indices(path: Path, config: Dict[str, Any], tensors: Dict[str, torch.Tensor],
                    dtype: torch.dtype) -> Any:
    """Per MoE layer, per expert, the saved indices (shapes, dtypes and order checked)."""
    ex = config.get("experts")
    if ex is None:
        return None
    E, I, H = ex["num_experts"], ex["intermediate_size"], ex["hidden_size"]
    out = []
    for m, c in enumerate(ex["counts"]):
        k = sum(c)
        if not k:
            out.append([torch.zeros(0, dtype=torch.int64)] * E)
            continue
        shapes = {"index": (k,), "gate_rows": (k, H), "up_rows": (k, H), "down_cols": (H, k)}
        for key, shape in shapes.items():
            t = tensors[f"experts.{m}.{key}"]
            want = torch.int64 if key == "index" else dtype
            if tuple(t.shape) != shape or t.dtype != want:
                raise NeuronFileError(f"{path}: experts.{m}.{key} is {t.dtype} {tuple(t.shape)}, expected {want} {shape}")
        flat = tensors[f"experts.{m}.index"]
        try:
            _, was_sorted = check_layer_indices(flat, f"experts.{m}.index", E * I, int64_tensor=True)
            if not was_sorted:
                raise ValueError("not sorted")
        except (TypeError, ValueError) as exc:
            raise NeuronFileError(f"{path}: experts.{m}.index must be sorted unique flat indices expert * {I} + neuron "
                                  f"in [0, {E * I}) ({exc})") from None
        per_expert = split_flat_index(flat, I, E)
        if [int(t.numel()) for t in per_expert] != list(c):
            raise NeuronFileError(f"{path}: experts.{m}.index does not match experts 'counts'[{m}] {c}")
        out.append(per_expert)
    return out


def _install(model: nn.Module, path: Path, config: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> None:
    info = _model_info(model)
    for key in ("num_layers", "hidden_size", "intermediate_size"):
        if config[key] != info[key]:
            raise NeuronFileError(f"{path}: {key} mismatch: file has {config[key]}, model has {info[key]}")
    counts = config["counts"]
    L, H, I = info["num_layers"], info["hidden_size"], info["intermediate_size"]
    if not isinstance(counts, list) or len(counts) != L or not all(isinstance(c, int) and c >= 0 for c in counts):
        raise NeuronFileError(f"{path}: 'counts' must list {L} non-negative ints, got {counts!r}")
    dtype = FLOAT_DTYPES.get(config["dtype"])
    if dtype is None:
        raise NeuronFileError(f"{path}: unsupported dtype {config['dtype']!r} (one of {sorted(FLOAT_DTYPES)})")
    expected = {f"layers.{li}.{key}" for li, c in enumerate(counts) if c for key in _KEYS}
    expected |= _expected_expert_keys(path, config, model)
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise NeuronFileError(f"{path}: tensors do not match 'counts' (missing {missing[:4]}, unexpected {extra[:4]})")
    indices, values = [], []
    for li, k in enumerate(counts):
        if not k:
            indices.append(torch.zeros(0, dtype=torch.int64))
            values.append(None)
            continue
        idx = tensors[f"layers.{li}.index"]
        shapes = {"index": (k,), "gate_rows": (k, H), "up_rows": (k, H), "down_cols": (H, k)}
        for key, shape in shapes.items():
            t = tensors[f"layers.{li}.{key}"]
            if tuple(t.shape) != shape:
                raise NeuronFileError(f"{path}: layers.{li}.{key} has shape {tuple(t.shape)}, expected {shape}")
            want = torch.int64 if key == "index" else dtype
            if t.dtype != want:
                raise NeuronFileError(f"{path}: layers.{li}.{key} has dtype {t.dtype}, expected {want}")
        try:
            _, was_sorted = check_layer_indices(idx, f"layers.{li}.index", I, int64_tensor=True)
            if not was_sorted:
                raise ValueError(f"layers.{li}.index is not sorted")
        except (TypeError, ValueError) as exc:
            raise NeuronFileError(f"{path}: layers.{li}.index must be sorted unique indices in [0, {I}) ({exc})") from None
        indices.append(idx)
        values.append(tuple(tensors[f"layers.{li}.{key}"] for key in ("gate_rows", "up_rows", "down_cols")))
    expert_indices = _expert_indices(path, config, tensors, dtype)
    set_trainable_neurons(model, indices if L else None, expert_neurons=expert_indices)
    model._lape_sparse["language"] = config.get("language")
    with torch.no_grad():
        for mlp, vals in zip(patching.patched_mlps(model), values):
            if vals is None:
                continue
            for name, v in zip(PARAM_NAMES, vals):
                p = getattr(mlp, name)
                p.copy_(v.to(device=p.device, dtype=p.dtype))
        for m, experts in enumerate(patching.patched_experts(model)):
            if experts._lape.sparse is None:
                continue
            for key, name in list(_KEYS.items())[1:]:
                p = getattr(experts, name)
                p.copy_(tensors[f"experts.{m}.{key}"].to(device=p.device, dtype=p.dtype))


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Write the trained neuron slices into the base weights and unpatch: a plain HF model
    (whatever wrapped its forward since ``patch`` goes too: see ``uninstall_chunked_loss``).
    Returns ``model`` as passed (a wrapper stays the wrapper)."""
    outer, model = model, unwrap(model)
    _require_trained(model, "merge")
    for mlp in patching.patched_mlps(model):
        if mlp._lape.sparse is None:
            continue
        wg, wu, wd = patching.weights(mlp)
        sel = getattr(mlp, INDEX_NAME)
        wg.index_copy_(0, sel, getattr(mlp, PARAM_NAMES[0]).detach().to(wg.dtype))
        wu.index_copy_(0, sel, getattr(mlp, PARAM_NAMES[1]).detach().to(wu.dtype))
        wd.index_copy_(1, sel, getattr(mlp, PARAM_NAMES[2]).detach().to(wd.dtype))
    for experts in patching.patched_experts(model):
        if experts._lape.sparse is None:
            continue
        gate_up, down = experts.gate_up_proj, experts.down_proj
        inter = down.shape[-1]
        flat = getattr(experts, INDEX_NAME)
        expert, local = torch.div(flat, inter, rounding_mode="floor"), flat % inter
        pg, pu, pd = (getattr(experts, n).detach() for n in PARAM_NAMES)
        gate_up[expert, local] = pg.to(gate_up.dtype)
        gate_up[expert, local + inter] = pu.to(gate_up.dtype)
        down[expert, :, local] = pd.t().to(down.dtype)
    patching.unpatch(model)
    return outer
