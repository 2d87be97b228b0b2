"""Fine-tune one target language with one method, under the same token budget and data order.

Methods (the paper's comparison, set up in ``methods.py``): ``neurons`` (the language's LAPE
neurons, sparse kernels), ``random`` (a random neuron set of the same total size), ``ffn`` (all
MLP weights), ``full`` (every weight), ``lora`` (PEFT LoRA on gate/up/down). The run directory it
writes is described in ``runs.py``.

Why the data order is a pure function of ``(seed, step)``: every method sees exactly the same
batches, and a resumed run continues with exactly the batch it would have seen, so an
interrupted-then-resumed run ends with the same weights, bit for bit, as an uninterrupted one.

Under ``torchrun`` the run is data-parallel (``dataparallel.py``): ``--batch-size`` stays the
global batch, split over the processes (DDP, or FSDP2 with ``--distributed fsdp2``), and the
result equals the one-process run's to fp32 rounding; rank 0 alone writes the run directory.

``python -m lape_kernels.experiment.finetune`` trains the FinetuneConfig read as JSON from stdin
(the demo runs each method in its own process this way: its peak memory is its own).
"""
from __future__ import annotations

import hashlib
import json
import math
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..distributed import main_first, run_on_main
from ..files import claim_output
from .config import DEFAULT_LR, METHODS, FinetuneConfig
from .dataparallel import DataParallel
from .errors import ExperimentError, Interrupted
from .inputs import corpus_texts, load_corpus, load_model, pack_split
from .methods import count_parameters, settings_hash, setup_method
from .outputs import dumps, partial_path, publish, read_json, remove_path, write_json_atomic
from .progress import PeakMemory, now, progress
from .runs import ARTIFACT_FORMAT, RUN_FORMAT, complete_run, save_artifact, trainable_named_parameters
from .safety import check_partial_inputs, damaged, input_record, read_log, reuse_complete, warn
from .runtime import (autocast, dtype_name, no_param_grads, parse_autocast, parse_device, parse_dtype,
                      seed_everything)

__all__ = ["METHODS", "DEFAULT_LR", "FinetuneConfig", "finetune", "batch_indices", "trainable_named_parameters",
           "RUN_FORMAT", "summary_lines"]


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


# ----------------------------------------------------------------------------- run
def _peak_rss_lifetime() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _say(cfg: FinetuneConfig, msg: str, main: bool = True) -> None:
    if not cfg.quiet and main:
        print(msg, file=sys.stderr, flush=True)


@dataclass
class _Job:
    """One training run, ready to go: the model set up for the method, the packed data, where
    the run is built and what names it."""

    cfg: FinetuneConfig
    model: nn.Module
    dp: DataParallel
    train_ids: torch.Tensor
    val_ids: torch.Tensor
    info: Dict[str, Any]
    trained_ns: Optional[Any]
    steps: int
    identity: Dict[str, Any]
    digest: str
    partial: Path
    out: Path
    device: torch.device
    dtype: torch.dtype
    amp: Optional[torch.dtype]
    state: Dict[str, Any] = field(default_factory=lambda: {"best": None, "elapsed_train_s": 0.0, "step_times": []})
    fwd: Optional[nn.Module] = None  # what a training step runs through (DDP around ``model``; else ``model``)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len

    def log(self, rec: Dict[str, Any]) -> None:
        if not self.dp.main:
            return
        with open(self.partial / "log.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def validate(self) -> Tuple[float, float]:
        """(mean validation NLL, perplexity) with the model in eval mode and no gradient work;
        under torchrun the mean over every process's share of the validation sequences."""
        self.model.eval()
        fwd = self.model if self.dp.kind != "fsdp2" else self.fwd  # DDP: the module inside, no collectives
        with autocast(self.device, self.amp), no_param_grads(self.model):
            nll, n = self.dp.validation_nll(fwd, self.val_ids, self.cfg.eval_batch_size or self.dp.micro, self.device)
        self.model.train()
        return nll / n, math.exp(nll / n)


def finetune(cfg: FinetuneConfig) -> Dict[str, Any]:
    """Train; returns the run summary (also in ``RUN_DIR/run.json``). Resumes a partial run.

    The output is held for the whole run (``claim_output``: one process, never over an input or
    another command's output without ``overwrite``); a finished run of the same settings is
    reused, and a checkpoint resumed, only when the recorded inputs (text digests, the model's
    fingerprint, the neurons) are the ones read now."""
    # rank 0 reads the neuron set first: a bad one is its one line, not one per process
    identity, digest, selection = main_first(lambda: settings_hash(cfg))
    dp = DataParallel.for_run(cfg.batch_size, cfg.grad_accum, cfg.distributed)  # the split checked before any work
    if dp.kind is None and cfg.distributed != "ddp":
        warn(f"--distributed {cfg.distributed} applies to a torchrun launch; this is one process", cfg.quiet)
    out = Path(cfg.out)

    def same_settings(path: Path) -> Optional[str]:
        return None if complete_run(path, digest) is not None else "a run with other settings, or not a run"

    with dp.held(lambda: claim_output(out, inputs=[cfg.model, cfg.data, cfg.neurons], overwrite=cfg.overwrite,
                                      reusable=same_settings, command="finetune")):
        return _finetune(cfg, identity, digest, selection, out, dp)


def _finetune(cfg: FinetuneConfig, identity: Dict[str, Any], digest: str, selection: Tuple[Any, Any],
              out: Path, dp: DataParallel) -> Dict[str, Any]:
    device = parse_device(cfg.device)
    dtype = parse_dtype(cfg.dtype, device, auto=torch.float32)
    amp = parse_autocast(cfg.autocast, device)
    # rank 0 builds the caches first, the others then read them
    corpus = main_first(lambda: load_corpus(cfg.data, [cfg.language], cache_dir=cfg.cache_dir))
    model, tokenizer = main_first(lambda: load_model(cfg.model, dtype, device, cfg.cache_dir))
    train_ids = pack_split(tokenizer, corpus, cfg.language, "train", cfg.seq_len)
    val_ids = pack_split(tokenizer, corpus, cfg.language, "validation", cfg.seq_len, cfg.val_tokens)
    if cfg.tokens is not None and cfg.tokens > train_ids.numel():
        warn(f"--tokens {cfg.tokens} is more than language {cfg.language!r}'s train text holds "
             f"({train_ids.numel()} tokens packed): it is repeated ({cfg.tokens / train_ids.numel():.1f} epochs)",
             cfg.quiet or not dp.main)
    inputs = input_record(model, {split: corpus_texts(corpus, cfg.language, split) for split in ("train", "validation")},
                          neurons=identity.get("neuron_set_digest"))

    def finished() -> Optional[Dict[str, Any]]:
        done = None if cfg.overwrite else complete_run(out, digest)
        if done is not None and reuse_complete(out, done.get("inputs"), inputs, quiet=cfg.quiet):
            return done
        return None

    done = run_on_main(finished)
    if done is not None:
        return done
    seed_everything(cfg.seed)
    model, info, trained_ns = setup_method(model, cfg, selection)
    info["train_digest"] = hashlib.sha256(train_ids.numpy().tobytes()).hexdigest()[:16]
    info["model_fingerprint"] = inputs["model_fingerprint"]
    info["inputs"] = inputs

    steps = cfg.steps if cfg.steps is not None else math.ceil(cfg.tokens / (cfg.batch_size * cfg.seq_len))
    partial = partial_path(out)

    def prepare() -> bool:
        """Rank 0: the interrupted run in ``partial`` checked (or removed with --overwrite); True
        when ``partial`` is new."""
        if partial.exists():
            if cfg.overwrite:
                remove_path(partial)
            else:
                prev = partial / "config.json"
                try:
                    recorded = read_json(prev) if prev.exists() else {}
                except ExperimentError as exc:
                    raise damaged(exc, partial) from None
                if recorded.get("config_hash") != digest:
                    raise ExperimentError(f"{partial} holds an interrupted run with other settings; pass --overwrite "
                                          f"to start over, or delete {partial}")
                check_partial_inputs(partial, recorded.get("inputs"), inputs, "run")
        created = not partial.exists()
        partial.mkdir(parents=True, exist_ok=True)
        return created

    created = run_on_main(prepare)
    job = _Job(cfg=cfg, model=model, dp=dp, train_ids=train_ids, val_ids=val_ids, info=info, trained_ns=trained_ns,
               steps=steps, identity=identity, digest=digest, partial=partial, out=out, device=device, dtype=dtype,
               amp=amp)
    try:
        return _train(job)
    except Interrupted:
        raise
    except BaseException:
        # nothing resumable yet -> leave nothing behind
        if dp.main and created and not (partial / "checkpoint").exists():
            remove_path(partial)
        raise


def _optimizer(job: _Job, params: List[nn.Parameter]):
    cfg = job.cfg
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    warm = cfg.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
    return opt, sched


def _resume(job: _Job, opt, sched) -> int:
    """The step to start from: a checkpoint's (its log trimmed to it), else 0 with a fresh log."""
    ckpt, log_path = job.partial / "checkpoint", job.partial / "log.jsonl"
    if ckpt.exists():
        try:
            start, job.state = job.dp.load_checkpoint(job.model, opt, sched, ckpt)
        except (ValueError, OSError) as exc:
            raise damaged(exc, job.partial) from None

        def trim() -> None:
            kept = read_log(log_path, start, job.partial)
            log_path.write_text("".join(ln + "\n" for ln in kept))

        run_on_main(trim)
        was = job.state.pop("world_size", 1)
        job.state.pop("distributed", None)
        moved = f", written by {was} process{'es' if was > 1 else ''}" if was != job.dp.world else ""
        _say(job.cfg, f"resuming {job.cfg.method} from step {start}/{job.steps} ({ckpt}{moved})", job.dp.main)
        return start
    if job.dp.main and log_path.exists():
        log_path.unlink()
    return 0


def _keep_best(job: _Job, step: int, vl: float, vp: float) -> None:
    if job.state["best"] is None or vl < job.state["best"]["val_loss"]:
        job.state["best"] = {"step": step, "val_loss": vl, "val_ppl": vp}
        best_tmp = job.partial / ".best.tmp"

        def write(model: nn.Module) -> None:
            if best_tmp.exists():
                remove_path(best_tmp)
            save_artifact(model, job.cfg.method, best_tmp)
            if job.dp.kind == "fsdp2" and ARTIFACT_FORMAT[job.cfg.method] == "neurons":
                _record_fingerprint(best_tmp, job.info["model_fingerprint"])
            publish(best_tmp, job.partial / "best")

        with job.dp.full_trainable(job.model) as model:  # FSDP2: full tensors on every rank, rank 0 writes
            run_on_main(lambda: write(model))


def _record_fingerprint(path: Path, fingerprint: Optional[str]) -> None:
    """The saved neurons' model fingerprint, read before FSDP2 sharded the weights (a sharded
    model's cannot be read: ``model_fingerprint`` says None)."""
    from ..training.io import CONFIG_NAME

    config = read_json(path / CONFIG_NAME)
    config["model_fingerprint"] = fingerprint
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def _step(job: _Job, step: int, perm_cache: Dict[int, torch.Tensor]) -> float:
    """Forward and backward of global batch ``step``: this process's share in ``--grad-accum``
    micro-batches, each mean loss weighted so that the gradients (averaged over processes) are
    those of the global batch's token mean. Returns that mean (summed over every process)."""
    cfg, dp, device = job.cfg, job.dp, job.device
    idx = batch_indices(step, cfg.batch_size, job.train_ids.shape[0], cfg.seed, perm_cache)
    n_global = idx.numel() * (cfg.seq_len - 1)  # packed sequences: every position after the first is a target
    micro = dp.micro_batches(idx)
    dp.seed_step(cfg.seed, step)
    total = 0.0
    for a, part in enumerate(micro):
        x = job.train_ids.index_select(0, part).to(device)
        n = x.shape[0] * (x.shape[1] - 1)
        weight = dp.loss_weight(n, n_global)
        with dp.sync(job.fwd, last=a + 1 == len(micro)):
            with autocast(device, job.amp):
                loss = job.fwd(input_ids=x, labels=x).loss.float()
            (loss if weight == 1.0 else loss * weight).backward()
        total += float(loss.detach()) * n
    (total,) = dp.sum_over_ranks(total)
    mean = total / n_global
    if not math.isfinite(mean):
        raise ExperimentError(f"loss became {mean} at step {step + 1}; lower --lr")
    return mean


def _train(job: _Job) -> Dict[str, Any]:
    cfg, model, partial, dp = job.cfg, job.model, job.partial, job.dp
    trainable, total = count_parameters(model)
    if cfg.method in ("neurons", "random", "lora"):
        total -= trainable  # the trained slices / adapters are extra parameters beside the base model
    if trainable == 0:
        raise ExperimentError(f"method {cfg.method}: no trainable parameters")
    job.fwd = dp.wrap(model, job.device)
    params = [p for _, p in trainable_named_parameters(model)]  # FSDP2: the sharded parameters
    opt, sched = _optimizer(job, params)
    save_every = cfg.eval_every if cfg.save_every is None else cfg.save_every

    def start_files() -> None:
        (partial / "config.json").write_text(dumps({"config_hash": job.digest, "identity": job.identity,
                                                    "inputs": job.info["inputs"], "world_size": dp.world}))
        if job.trained_ns is not None and not (partial / "neurons").exists():
            job.trained_ns.save(partial / "neurons")

    run_on_main(start_files)
    ckpt = partial / "checkpoint"
    start = _resume(job, opt, sched)
    if cfg.eval_at_start and start == 0:
        vl, vp = job.validate()
        job.log({"step": 0, "tokens": 0, "val_loss": vl, "val_ppl": vp})

    perm_cache: Dict[int, torch.Tensor] = {}
    steps, tokens_per_step, device = job.steps, job.tokens_per_step, job.device
    bar = progress(steps * tokens_per_step, f"{cfg.method}:{cfg.language}", initial=start * tokens_per_step,
                   disable=not dp.main)  # rank 0's bar: global tokens/s
    model.train()
    mem = PeakMemory(device)
    mem.__enter__()
    step_times: List[float] = list(job.state.get("step_times", []))
    try:
        for step in range(start, steps):
            t0 = now()
            lr_now = opt.param_groups[0]["lr"]
            loss = _step(job, step, perm_cache)
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else None
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = now() - t0
            mem.sample()
            step_times.append(dt)
            rec = {"step": step + 1, "tokens": (step + 1) * tokens_per_step, "loss": loss,
                   "lr": lr_now, "grad_norm": dp.grad_norm(gn), "step_time_s": dt,
                   "tokens_per_s": tokens_per_step / dt}
            bar.update(tokens_per_step)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            last = step + 1 == steps
            if (step + 1) % cfg.eval_every == 0 or last:
                vl, vp = job.validate()
                rec.update(val_loss=vl, val_ppl=vp)
                _keep_best(job, step + 1, vl, vp)
            job.log(rec)
            job.state["step_times"] = step_times
            stop_now = cfg.stop_after_steps is not None and step + 1 == cfg.stop_after_steps and not last
            if not last and (stop_now or (save_every and (step + 1) % save_every == 0)):
                dp.save_checkpoint(model, opt, sched, step + 1, job.state, ckpt)
            if stop_now:
                raise Interrupted(f"stopped after {step + 1} of {steps} steps (--stop-after-steps); "
                                  f"rerun the same command to resume from {ckpt}")
    finally:
        bar.close()
        peak = mem.stop()

    def finish() -> Dict[str, Any]:
        summary = _summary(job, trainable, total, step_times, peak, mem.kind)
        write_json_atomic(partial / "run.json", summary)
        if ckpt.exists():
            remove_path(ckpt)
        (partial / "config.json").unlink()
        publish(partial, job.out)
        return summary

    summary = run_on_main(finish)  # rank 0 writes; every rank returns its summary
    best = job.state["best"]
    procs = f", {dp.world} processes ({dp.kind})" if dp.world > 1 else ""
    _say(cfg, f"{cfg.method}: {steps} steps, best val ppl {best['val_ppl']:.3f} "
              f"(step {best['step']}), {summary['tokens_per_s']:.0f} tok/s{procs} -> {job.out}", dp.main)
    return summary


def _summary(job: _Job, trainable: int, total: int, step_times: List[float], peak: int, peak_kind: str
             ) -> Dict[str, Any]:
    """The content of ``run.json``."""
    cfg = job.cfg
    final = json.loads((job.partial / "log.jsonl").read_text().splitlines()[-1])
    timed = step_times[1:] if len(step_times) > 1 else step_times
    mean_step = sum(timed) / len(timed)
    return {
        "format": RUN_FORMAT,
        "complete": True,
        "config_hash": job.digest,
        "method": cfg.method,
        "language": cfg.language,
        "model": cfg.model,
        "data": cfg.data or "builtin",
        "neurons": cfg.neurons,
        "settings": job.identity,
        "lr": cfg.learning_rate,
        "steps": job.steps,
        "tokens_per_step": job.tokens_per_step,
        "tokens_trained": job.steps * job.tokens_per_step,
        "train_sequences": int(job.train_ids.shape[0]),
        "val_tokens": int(job.val_ids.numel()),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "peak_rss_lifetime_bytes": _peak_rss_lifetime(),
        "mean_step_time_s": mean_step,
        "tokens_per_s": job.tokens_per_step / mean_step,
        "best": job.state["best"],
        "final": {"step": final["step"], "loss": final.get("loss"), "val_loss": final.get("val_loss"),
                  "val_ppl": final.get("val_ppl")},
        "artifact": "best",
        "artifact_format": ARTIFACT_FORMAT[cfg.method],
        "device": str(job.device),
        "dtype": dtype_name(job.dtype),
        "autocast": dtype_name(job.amp) if job.amp is not None else None,
        "torch_threads": torch.get_num_threads(),
        "world_size": job.dp.world,
        "distributed": job.dp.kind,
        "grad_accum": cfg.grad_accum,
        **job.info,
    }


def summary_lines(summary: Dict[str, Any], cfg: FinetuneConfig) -> str:
    """What ``lape-kernels finetune`` prints on stdout when a run is done."""
    return (f"trainable parameters: {summary['trainable_params']:,} of {summary['total_params']:,} "
            f"({100 * summary['trainable_fraction']:.4f}%)\n{cfg.out}")


def _main() -> int:
    """Train the FinetuneConfig read (JSON, ``Config.to_dict``) from stdin; errors as the CLI's."""
    from .errors import run_reporting

    def work() -> int:
        cfg = FinetuneConfig.from_dict(json.loads(sys.stdin.read()), where="finetune config (stdin)")
        print(summary_lines(finetune(cfg), cfg))
        return 0

    return run_reporting("lape-kernels finetune", work)


if __name__ == "__main__":
    sys.exit(_main())
