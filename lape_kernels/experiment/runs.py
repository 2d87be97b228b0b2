"""The run directory ``lape-kernels finetune`` writes and ``eval`` / the demo read: its format
tag, the best checkpoint in each method's own compact format (save), the resumable checkpoint
(save/load), reading a finished run (load) and merging its checkpoint into a model (apply).

Layout (built in ``.<RUN_DIR>.partial``, renamed into place when complete)::

    run.json        settings, trainable parameters, peak memory, step time, tokens/s, best/final val
    log.jsonl       one line per step (step, tokens, loss, lr, grad_norm, step_time_s, tokens_per_s,
                    and val_loss/val_ppl at evaluation steps)
    best/           the best checkpoint by validation loss: neurons (PEFT-shaped, save_neurons),
                    a LoRA adapter, or weights.safetensors of the changed weights (ffn/full)
    neurons/        the neuron set trained (neurons/random)
    checkpoint/     (only while incomplete) trainable weights, optimizer, scheduler, RNG, step;
                    under ``--distributed fsdp2`` the weights and optimizer state are
                    ``sharded/`` (torch.distributed.checkpoint, ``dataparallel.py``); either
                    kind resumes under either kind and any number of processes

Under ``torchrun`` rank 0 alone writes all of it (full tensors), and ``run.json`` records
``world_size``, ``distributed`` and ``grad_accum``.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .errors import ExperimentError, reworded
from .outputs import dumps, publish, read_json, remove_path

__all__ = ["RUN_FORMAT", "ARTIFACT_FORMAT", "trainable_named_parameters", "base_model", "save_artifact",
           "save_checkpoint", "load_checkpoint", "complete_run", "load_run_info", "apply_run"]

RUN_FORMAT = "lape_kernels.run"
ARTIFACT_FORMAT = {"neurons": "neurons", "random": "neurons", "lora": "lora", "ffn": "weights", "full": "weights"}


def trainable_named_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """Trainable parameters in a fixed order (the optimizer's and the checkpoint's)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def base_model(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def save_artifact(model: nn.Module, method: str, path: Path) -> None:
    """The method's own compact format: neurons -> save_neurons; lora -> adapter; else the
    changed (trainable) weights only."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    fmt = ARTIFACT_FORMAT[method]
    if fmt == "neurons":
        from ..training import save_neurons

        save_neurons(model, path)
    elif fmt == "lora":
        model.save_pretrained(str(path))
    else:
        base = base_model(model)
        tensors = {n: p.detach().to("cpu").contiguous() for n, p in trainable_named_parameters(base)}
        save_file(tensors, str(path / "weights.safetensors"), metadata={"format": "lape_kernels.weights"})


def save_checkpoint(model: nn.Module, opt, sched, step: int, state: Dict[str, Any], path: Path) -> None:
    """Everything a resume needs, written to a temporary folder and renamed into place."""
    from safetensors.torch import save_file

    tmp = path.parent / f".{path.name}.tmp"
    if tmp.exists():
        remove_path(tmp)
    tmp.mkdir(parents=True)
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in trainable_named_parameters(model)}
    save_file(tensors, str(tmp / "trainable.safetensors"))
    blob = {
        "step": step,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(blob, tmp / "state.pt")
    (tmp / "state.json").write_text(dumps(state))
    publish(tmp, path)


def load_checkpoint(model: nn.Module, opt, sched, path: Path) -> Tuple[int, Dict[str, Any]]:
    """Restore a resumable checkpoint into ``model``, ``opt`` and ``sched``; returns (step, loop
    state). A file that cannot be read is a ValueError naming it and the cause."""
    from ..files import load_safetensors

    tensors = load_safetensors(path / "trainable.safetensors")
    named = dict(trainable_named_parameters(model))
    if set(tensors) != set(named):
        raise ExperimentError(f"checkpoint {path} does not match this run's trainable parameters "
                              f"(remove it to start over)")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(tensors[n].to(p.device, p.dtype))
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of damaged files
            warnings.simplefilter("ignore")
            blob = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["rng_cpu"])
    except Exception as exc:  # noqa: BLE001 - any unreadable state: named, with its kind of failure
        raise ValueError(f"{path / 'state.pt'}: not a checkpoint state written by lape_kernels "
                         f"({type(exc).__name__})") from None
    if blob.get("rng_cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng_cuda"])
    try:
        state = json.loads((path / "state.json").read_text())
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path / 'state.json'}: not readable JSON ({type(exc).__name__}: {exc})") from None
    return int(blob["step"]), state


def complete_run(out: Path, digest: str) -> Optional[Dict[str, Any]]:
    run_json = out / "run.json"
    if not run_json.exists():
        return None
    info = read_json(run_json)
    if info.get("format") == RUN_FORMAT and info.get("complete") and info.get("config_hash") == digest:
        return info
    return None


def load_run_info(run_dir: Path) -> Dict[str, Any]:
    run_json = run_dir / "run.json"
    if not run_json.exists():
        raise ExperimentError(f"--run {run_dir}: not a finished run (no run.json; an interrupted run lives in "
                              f".{run_dir.name}.partial until it completes)")
    info = read_json(run_json)
    if info.get("format") != RUN_FORMAT or not info.get("complete"):
        raise ExperimentError(f"--run {run_dir}: run.json is not a complete lape_kernels run")
    return info


def apply_run(model: nn.Module, run_dir: Path, info: Optional[Dict[str, Any]] = None, *,
              allow_other_model: bool = False) -> nn.Module:
    """Merge a run's best checkpoint into ``model`` (in place for neurons and weights; LoRA is
    merged and unloaded). Returns the plain (unpatched) model. Saved neurons check the model's
    fingerprint themselves (``allow_other_model``: a deliberate transfer)."""
    from .. import api, patching

    info = info or load_run_info(run_dir)
    art = run_dir / info.get("artifact", "best")
    fmt = info.get("artifact_format")
    if not art.exists():
        raise ExperimentError(f"--run {run_dir}: checkpoint {art} is missing")
    if fmt not in ("neurons", "lora", "weights"):
        raise ExperimentError(f"--run {run_dir}: unknown artifact format {fmt!r}")
    if patching.is_patched(model):
        api.unpatch(model)
    with reworded(f"--run {run_dir} does not fit the model", ValueError, RuntimeError, OSError, KeyError):
        if fmt == "neurons":
            from ..training import load_neurons, merge

            load_neurons(model, art, allow_other_model=allow_other_model)
            merge(model)
        elif fmt == "lora":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(art)).merge_and_unload()
        else:
            _copy_weights(model, run_dir, art / "weights.safetensors")
    return model


def _copy_weights(model: nn.Module, run_dir: Path, path: Path) -> None:
    """A ``weights`` artifact's tensors copied into the model's parameters of the same names."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ExperimentError(f"--run {run_dir}: weights {unknown[:3]} are not in the model (another model?)")
    with torch.no_grad():
        for name, t in tensors.items():
            p = params[name]
            if p.shape != t.shape:
                raise ExperimentError(f"--run {run_dir}: {name} has shape {tuple(t.shape)}, the model "
                                      f"{tuple(p.shape)} (another model?)")
            p.copy_(t.to(p.device, p.dtype))
