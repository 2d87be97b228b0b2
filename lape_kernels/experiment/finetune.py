"""Fine-tune one target language with one method, under the same token budget and data order.

Methods (the paper's comparison): ``neurons`` (the language's LAPE neurons, sparse kernels),
``random`` (a random neuron set of the same total size), ``ffn`` (all MLP weights), ``full``
(every weight), ``lora`` (PEFT LoRA on gate/up/down).

Why the data order is a pure function of ``(seed, step)``: every method sees exactly the same
batches, and a resumed run continues with exactly the batch it would have seen, so an
interrupted-then-resumed run ends with the same weights, bit for bit, as an uninterrupted one.

Layout of a run directory (built in ``.<RUN_DIR>.partial``, renamed into place when complete)::

    run.json        settings, trainable parameters, peak memory, step time, tokens/s, best/final val
    log.jsonl       one line per step (step, tokens, loss, lr, grad_norm, step_time_s, tokens_per_s,
                    and val_loss/val_ppl at evaluation steps)
    best/           the best checkpoint by validation loss: neurons (PEFT-shaped, save_neurons),
                    a LoRA adapter, or weights.safetensors of the changed weights (ffn/full)
    neurons/        the neuron set trained (neurons/random)
    checkpoint/     (only while incomplete) trainable weights, optimizer, scheduler, RNG, step
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .common import (
    ExperimentError,
    Interrupted,
    PeakMemory,
    no_param_grads,
    autocast,
    config_hash,
    corpus_texts,
    dtype_name,
    dumps,
    load_corpus,
    load_model,
    now,
    one_line,
    pack,
    parse_device,
    parse_autocast,
    parse_dtype,
    partial_path,
    progress,
    read_json,
    remove_path,
    seed_everything,
    write_json_atomic,
    _publish,
)

__all__ = ["METHODS", "DEFAULT_LR", "FinetuneConfig", "finetune", "batch_indices", "trainable_named_parameters",
           "RUN_FORMAT"]

METHODS = ("neurons", "random", "ffn", "full", "lora")
DEFAULT_LR = {"neurons": 1e-4, "random": 1e-4, "lora": 1e-4, "ffn": 1e-5, "full": 1e-5}
RUN_FORMAT = "lape_kernels.run"
ARTIFACT_FORMAT = {"neurons": "neurons", "random": "neurons", "lora": "lora", "ffn": "weights", "full": "weights"}

# settings that do not change the result (left out of the resume/identity hash)
# (recompute: bit-identical training, only memory and time differ; tested)
_NOT_HASHED = ("out", "stop_after_steps", "overwrite", "cache_dir", "save_every", "quiet", "recompute")


@dataclass
class FinetuneConfig:
    """All settings of one run; defaults follow the paper (AdamW, wd 0.01, clip 1.0, 512-token
    packed sequences, lr 1e-4 for neurons/random/LoRA and 1e-5 for full/FFN)."""

    model: str
    language: str
    method: str
    out: str
    data: Optional[str] = None
    neurons: Optional[str] = None
    neuron_languages: Optional[List[str]] = None
    tokens: Optional[int] = None
    steps: Optional[int] = None
    lr: Optional[float] = None
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 0
    seq_len: int = 512
    batch_size: int = 4
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    eval_every: int = 50
    eval_at_start: bool = False
    val_tokens: int = 16384
    eval_batch_size: Optional[int] = None
    save_every: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    autocast: str = "auto"
    cache_dir: Optional[str] = None
    stop_after_steps: Optional[int] = None
    overwrite: bool = False
    quiet: bool = False
    recompute: str = "none"

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
        for name in ("seq_len", "batch_size", "eval_every", "val_tokens", "lora_r", "lora_alpha"):
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
        d = dataclasses.asdict(self)
        for k in _NOT_HASHED:
            d.pop(k, None)
        d["lr"] = self.learning_rate
        return d


# ----------------------------------------------------------------------------- data order
def batch_indices(step: int, batch_size: int, num_sequences: int, seed: int,
                  _cache: Optional[Dict[int, torch.Tensor]] = None) -> torch.Tensor:
    """Sequence indices of batch ``step`` (0-based): positions ``step*B ... step*B+B-1`` of an
    endless stream of epochs, each a permutation drawn from ``seed`` and the epoch number.

    A pure function of its arguments: the same for every method, and the same after a resume.
    """
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, num_sequences)
        perm = None if _cache is None else _cache.get(epoch)
        if perm is None:
            gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + epoch) % (2 ** 63 - 1))
            perm = torch.randperm(num_sequences, generator=gen)
            if _cache is not None:
                _cache.clear()
                _cache[epoch] = perm
        out.append(int(perm[i]))
    return torch.tensor(out, dtype=torch.int64)


# ----------------------------------------------------------------------------- methods
def trainable_named_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """Trainable parameters in a fixed order (the optimizer's and the checkpoint's)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _mlp_module_names(model: nn.Module) -> List[str]:
    from .. import introspection

    return list(introspection.family_for(model).linear_names)


def _model_intermediate_size(spec: str, cache_dir: Optional[str]) -> Optional[int]:
    """The MLP width from the model's config alone (no weights), or None when not at hand."""
    from ..introspection import model_shape

    candidates = []
    try:
        from ..data import model_cache_dir

        candidates.append(model_cache_dir(spec, str(Path(cache_dir) / "models") if cache_dir else None))
    except ValueError:
        pass
    candidates.append(Path(spec).expanduser())
    for c in candidates:
        if (c / "config.json").exists():
            try:
                from transformers import AutoConfig

                return model_shape(AutoConfig.from_pretrained(str(c)))[1]
            except Exception:  # noqa: BLE001 - unknown here; checked against the model later
                return None
    try:
        from transformers import AutoConfig

        return model_shape(AutoConfig.from_pretrained(spec, local_files_only=True))[1]
    except Exception:  # noqa: BLE001
        return None


def _load_neuron_set(path: str, language: str, languages: Optional[Sequence[str]] = None,
                     intermediate_size: Optional[int] = None):
    from ..neurons import NeuronSet

    try:
        ns = NeuronSet.load(path, languages=languages, intermediate_size=intermediate_size)
    except FileNotFoundError:
        raise ExperimentError(f"--neurons {path}: no such neuron set") from None
    except (ValueError, TypeError, OSError) as exc:
        raise ExperimentError(f"--neurons {path}: {one_line(exc)}") from None
    if language not in ns.languages:
        raise ExperimentError(f"--neurons {path} has no language {language!r} (it has {', '.join(ns.languages)})")
    return ns


def neuron_selection(cfg: FinetuneConfig) -> Tuple[Optional[Any], Optional[List[torch.Tensor]]]:
    """(source NeuronSet, per-layer neurons to train) for neurons/random, else (None, None)."""
    if cfg.method not in ("neurons", "random"):
        return None, None
    ns = _load_neuron_set(cfg.neurons, cfg.language, cfg.neuron_languages)
    if ns.intermediate_size is None:  # a LAPE reference file: the shape comes from the model
        inter = _model_intermediate_size(cfg.model, cfg.cache_dir)
        if inter is not None:
            ns = _load_neuron_set(cfg.neurons, cfg.language, cfg.neuron_languages, inter)
    if cfg.method == "neurons":
        per_layer = ns.select(cfg.language)
    else:
        try:
            per_layer = ns.random_like(cfg.language, seed=cfg.seed, mode="total")
        except ValueError as exc:
            raise ExperimentError(f"--neurons {cfg.neurons}: {one_line(exc)}") from None
    if sum(int(t.numel()) for t in per_layer) == 0:
        raise ExperimentError(f"--neurons {cfg.neurons}: language {cfg.language!r} has no neurons to train")
    return ns, per_layer


def _per_layer_digest(per_layer: List[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in per_layer:
        h.update(str(t.numel()).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def settings_hash(cfg: FinetuneConfig) -> Tuple[Dict[str, Any], str, Tuple[Optional[Any], Optional[List[torch.Tensor]]]]:
    """(identity, hash, neuron selection): the hash names a result; a finished run with the same
    hash is reused, a checkpoint with the same hash is resumed. Cheap: loads no model."""
    cfg.check()
    selection = neuron_selection(cfg)
    identity = cfg.identity()
    identity["neuron_set_digest"] = _per_layer_digest(selection[1]) if selection[1] is not None else None
    return identity, config_hash(identity), selection


def setup_method(model: nn.Module, cfg: FinetuneConfig,
                 selection: Tuple[Optional[Any], Optional[List[torch.Tensor]]] = (None, None)
                 ) -> Tuple[nn.Module, Dict[str, Any], Optional[Any]]:
    """Make the method's parameters trainable (everything else frozen).

    Returns (model to train, info, the NeuronSet trained for neurons/random else None).
    Every method runs on the patched model (fused MLP kernel, chunked LM loss), so timing and
    memory compare methods, not implementations.
    """
    from .. import api, patching
    from ..neurons import NeuronSet

    info: Dict[str, Any] = {}
    trained_ns = None
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.method in ("neurons", "random"):
        ns, per_layer = selection if selection[0] is not None else neuron_selection(cfg)
        try:
            ns.validate(model)
        except (ValueError, TypeError) as exc:
            raise ExperimentError(f"--neurons {cfg.neurons} does not fit the model: {one_line(exc)}") from None
        total = sum(int(t.numel()) for t in per_layer)
        trained_ns = NeuronSet({cfg.language: per_layer}, ns.num_layers, ns.intermediate_size,
                               model_id=ns.model_id, hidden_size=ns.hidden_size,
                               notes=[f"{cfg.method} set for {cfg.language} (seed {cfg.seed})"
                                      if cfg.method == "random" else f"LAPE neurons of {cfg.language}"])
        try:
            api.patch(model, neurons=per_layer, recompute=cfg.recompute)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ExperimentError(f"--neurons {cfg.neurons} does not fit the model: {one_line(exc)}") from None
        info["neuron_count"] = total
        info["neurons_per_layer"] = [int(t.numel()) for t in per_layer]
        info["neuron_set_digest"] = _per_layer_digest(per_layer)
        info["source_neuron_set_digest"] = _per_layer_digest(ns[cfg.language])
    elif cfg.method == "ffn":
        api.patch(model)
        for mlp in patching.patched_mlps(model):
            for p in mlp.parameters():
                p.requires_grad_(True)
    elif cfg.method == "full":
        api.patch(model)
        for p in model.parameters():
            p.requires_grad_(True)
    elif cfg.method == "lora":
        api.patch(model)
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:  # pragma: no cover - peft is a requirement
            raise ExperimentError(f"--method lora needs peft: {exc}") from None
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=_mlp_module_names(model), bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
    return model, info, trained_ns


def _base_model(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) over unique parameters (tied weights once)."""
    seen = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


# ----------------------------------------------------------------------------- artifacts
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
        base = _base_model(model)
        tensors = {n: p.detach().to("cpu").contiguous() for n, p in trainable_named_parameters(base)}
        save_file(tensors, str(path / "weights.safetensors"), metadata={"format": "lape_kernels.weights"})


def _save_checkpoint(model: nn.Module, opt, sched, step: int, state: Dict[str, Any], path: Path) -> None:
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
    _publish(tmp, path)


def _load_checkpoint(model: nn.Module, opt, sched, path: Path) -> Tuple[int, Dict[str, Any]]:
    from safetensors.torch import load_file

    tensors = load_file(str(path / "trainable.safetensors"))
    named = dict(trainable_named_parameters(model))
    if set(tensors) != set(named):
        raise ExperimentError(f"checkpoint {path} does not match this run's trainable parameters "
                              f"(remove it to start over)")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(tensors[n].to(p.device, p.dtype))
    blob = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng_cpu"])
    if blob.get("rng_cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng_cuda"])
    state = json.loads((path / "state.json").read_text())
    return int(blob["step"]), state


# ----------------------------------------------------------------------------- loop
def _peak_rss_lifetime() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _existing_complete(out: Path, digest: str) -> Optional[Dict[str, Any]]:
    run_json = out / "run.json"
    if not run_json.exists():
        return None
    info = read_json(run_json)
    if info.get("format") == RUN_FORMAT and info.get("complete") and info.get("config_hash") == digest:
        return info
    return None


def _say(cfg: FinetuneConfig, msg: str) -> None:
    if not cfg.quiet:
        print(msg, file=sys.stderr, flush=True)


def finetune(cfg: FinetuneConfig) -> Dict[str, Any]:
    """Train; returns the run summary (also in ``RUN_DIR/run.json``). Resumes a partial run."""
    from .evaluate import mean_nll

    identity, digest, selection = settings_hash(cfg)
    out = Path(cfg.out)
    done = _existing_complete(out, digest)
    if done is not None and not cfg.overwrite:  # deterministic: the same settings give the same result
        _say(cfg, f"{out}: already complete (same settings); nothing to do")
        return done
    if out.exists() and not cfg.overwrite:
        raise ExperimentError(f"{out} exists (a run with other settings, or not a run); pass --overwrite to replace it")
    device = parse_device(cfg.device)
    dtype = parse_dtype(cfg.dtype, device, auto=torch.float32)
    amp = parse_autocast(cfg.autocast, device)
    corpus = load_corpus(cfg.data, [cfg.language], cache_dir=cfg.cache_dir)

    model, tokenizer = load_model(cfg.model, dtype, device, cfg.cache_dir)
    train_ids = pack(tokenizer, corpus_texts(corpus, cfg.language, "train"), cfg.seq_len,
                     what=f"language {cfg.language!r} train split")
    val_ids = pack(tokenizer, corpus_texts(corpus, cfg.language, "validation"), cfg.seq_len,
                   max_tokens=cfg.val_tokens, what=f"language {cfg.language!r} validation split")
    seed_everything(cfg.seed)
    model, info, trained_ns = setup_method(model, cfg, selection)
    info["train_digest"] = hashlib.sha256(train_ids.numpy().tobytes()).hexdigest()[:16]

    tokens_per_step = cfg.batch_size * cfg.seq_len
    steps = cfg.steps if cfg.steps is not None else math.ceil(cfg.tokens / tokens_per_step)
    partial = partial_path(out)
    if partial.exists():
        prev = partial / "config.json"
        same = prev.exists() and read_json(prev).get("config_hash") == digest
        if not same:
            if not cfg.overwrite:
                raise ExperimentError(f"{partial} holds an interrupted run with other settings; remove it or "
                                      f"pass --overwrite")
            remove_path(partial)
    created = not partial.exists()
    partial.mkdir(parents=True, exist_ok=True)
    try:
        return _train(cfg, model, tokenizer, train_ids, val_ids, info, trained_ns, steps, identity, digest,
                      partial, out, device, dtype, amp, mean_nll)
    except Interrupted:
        raise
    except BaseException:
        # nothing resumable yet -> leave nothing behind
        if created and not (partial / "checkpoint").exists():
            remove_path(partial)
        raise


def _train(cfg, model, tokenizer, train_ids, val_ids, info, trained_ns, steps, identity, digest,
           partial: Path, out: Path, device, dtype, amp, mean_nll) -> Dict[str, Any]:
    lr = cfg.learning_rate
    named = trainable_named_parameters(model)
    params = [p for _, p in named]
    trainable, total = count_parameters(model)
    if cfg.method in ("neurons", "random", "lora"):
        total -= trainable  # the trained slices / adapters are extra parameters beside the base model
    if trainable == 0:
        raise ExperimentError(f"method {cfg.method}: no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    warm = cfg.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
    save_every = cfg.eval_every if cfg.save_every is None else cfg.save_every
    eval_bs = cfg.eval_batch_size or cfg.batch_size

    (partial / "config.json").write_text(dumps({"config_hash": digest, "identity": identity}))
    if trained_ns is not None and not (partial / "neurons").exists():
        trained_ns.save(partial / "neurons")

    ckpt = partial / "checkpoint"
    log_path = partial / "log.jsonl"
    start = 0
    state: Dict[str, Any] = {"best": None, "elapsed_train_s": 0.0, "step_times": []}
    if ckpt.exists():
        start, state = _load_checkpoint(model, opt, sched, ckpt)
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= start]
        log_path.write_text("".join(ln + "\n" for ln in kept))
        _say(cfg, f"resuming {cfg.method} from step {start}/{steps} ({ckpt})")
    elif log_path.exists():
        log_path.unlink()

    def log(rec: Dict[str, Any]) -> None:
        with open(log_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def validate() -> Tuple[float, float]:
        model.eval()
        with autocast(device, amp), no_param_grads(model):
            nll, n = mean_nll(model, val_ids, eval_bs, device)
        model.train()
        return nll / n, math.exp(nll / n)

    if cfg.eval_at_start and start == 0:
        vl, vp = validate()
        log({"step": 0, "tokens": 0, "val_loss": vl, "val_ppl": vp})

    perm_cache: Dict[int, torch.Tensor] = {}
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = progress(steps * tokens_per_step, f"{cfg.method}:{cfg.language}", initial=start * tokens_per_step)
    model.train()
    mem = PeakMemory(device)
    mem.__enter__()
    step_times: List[float] = list(state.get("step_times", []))
    try:
        for step in range(start, steps):
            idx = batch_indices(step, cfg.batch_size, train_ids.shape[0], cfg.seed, perm_cache)
            x = train_ids.index_select(0, idx).to(device)
            t0 = now()
            lr_now = opt.param_groups[0]["lr"]
            with autocast(device, amp):
                loss = model(input_ids=x, labels=x).loss.float()
            if not torch.isfinite(loss):
                raise ExperimentError(f"loss became {loss.item()} at step {step + 1}; lower --lr")
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else None
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = now() - t0
            mem.sample()
            step_times.append(dt)
            rec = {"step": step + 1, "tokens": (step + 1) * tokens_per_step, "loss": float(loss.item()),
                   "lr": lr_now, "grad_norm": None if gn is None else float(gn), "step_time_s": dt,
                   "tokens_per_s": tokens_per_step / dt}
            bar.update(tokens_per_step)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            last = step + 1 == steps
            if (step + 1) % cfg.eval_every == 0 or last:
                vl, vp = validate()
                rec.update(val_loss=vl, val_ppl=vp)
                if state["best"] is None or vl < state["best"]["val_loss"]:
                    state["best"] = {"step": step + 1, "val_loss": vl, "val_ppl": vp}
                    best_tmp = partial / ".best.tmp"
                    if best_tmp.exists():
                        remove_path(best_tmp)
                    save_artifact(model, cfg.method, best_tmp)
                    _publish(best_tmp, partial / "best")
            log(rec)
            state["step_times"] = step_times
            stop_now = cfg.stop_after_steps is not None and step + 1 == cfg.stop_after_steps and not last
            if not last and (stop_now or (save_every and (step + 1) % save_every == 0)):
                _save_checkpoint(model, opt, sched, step + 1, state, ckpt)
            if stop_now:
                raise Interrupted(f"stopped after {step + 1} of {steps} steps (--stop-after-steps); "
                                  f"rerun the same command to resume from {ckpt}")
    finally:
        bar.close()
        peak = mem.stop()

    final = json.loads(log_path.read_text().splitlines()[-1])
    timed = step_times[1:] if len(step_times) > 1 else step_times
    mean_step = sum(timed) / len(timed)
    summary = {
        "format": RUN_FORMAT,
        "complete": True,
        "config_hash": digest,
        "method": cfg.method,
        "language": cfg.language,
        "model": cfg.model,
        "data": cfg.data or "builtin",
        "neurons": cfg.neurons,
        "settings": identity,
        "lr": cfg.learning_rate,
        "steps": steps,
        "tokens_per_step": tokens_per_step,
        "tokens_trained": steps * tokens_per_step,
        "train_sequences": int(train_ids.shape[0]),
        "val_tokens": int(val_ids.numel()),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total,
        "peak_memory_bytes": peak,
        "peak_memory_kind": mem.kind,
        "peak_rss_lifetime_bytes": _peak_rss_lifetime(),
        "mean_step_time_s": mean_step,
        "tokens_per_s": tokens_per_step / mean_step,
        "best": state["best"],
        "final": {"step": final["step"], "loss": final.get("loss"), "val_loss": final.get("val_loss"),
                  "val_ppl": final.get("val_ppl")},
        "artifact": "best",
        "artifact_format": ARTIFACT_FORMAT[cfg.method],
        "device": str(device),
        "dtype": dtype_name(dtype),
        "autocast": dtype_name(amp) if amp is not None else None,
        "torch_threads": torch.get_num_threads(),
        **info,
    }
    write_json_atomic(partial / "run.json", summary)
    if ckpt.exists():
        remove_path(ckpt)
    (partial / "config.json").unlink()
    _publish(partial, out)
    _say(cfg, f"{cfg.method}: {steps} steps, best val ppl {state['best']['val_ppl']:.3f} "
              f"(step {state['best']['step']}), {summary['tokens_per_s']:.0f} tok/s -> {out}")
    return summary
