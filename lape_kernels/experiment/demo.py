"""``lape-kernels demo`` (``make demo``): the paper's comparison end to end, offline, on a CPU.

corpus -> collect LAPE statistics over >= 8 languages -> identify language neurons -> fine-tune an
under-resourced target language with ``neurons``, ``random`` (same size) and ``full`` (``--full``:
all five methods, larger budgets) on the same tokens -> evaluate before/after -> report.md + PNGs.

Each stage's output is kept under ``--out``; a rerun with the same settings reuses finished stages
(and resumes interrupted ones), ``--fresh`` starts over. The budgets below are sized so that the
quick demo ends in about ten minutes on a 2-core CPU with Gemma-3-270M (see examples/README.md for
the measured stage times); ``--config FILE`` overrides any of them (JSON object).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from .config import FinetuneConfig
from .errors import ExperimentError
from .inputs import corpus_texts, load_corpus, validation_digests
from .outputs import partial_path, read_json, remove_path, write_json_atomic
from .progress import now

__all__ = ["QUICK", "FULL", "TARGET_PREFERENCE", "run_demo", "choose_target", "demo_settings"]

#: under-resourced languages, in order of preference for the target
TARGET_PREFERENCE = ("cy", "mt", "eu", "is", "ga", "gd", "br", "ka", "mk", "ne", "af", "lv", "sl", "gl")

QUICK: Dict[str, Any] = {
    "model": "gemma3-270m",
    # English, four high-resource references with two scripts, three under-resourced languages
    "languages": ["en", "de", "fr", "es", "ru", "cy", "eu", "is"],
    "methods": ["neurons", "random", "full"],
    # collect: tokens per language (packed 512-token sequences, decoder body only)
    "collect_tokens": 4096,
    "collect_seq_len": 512,
    "collect_batch_size": 4,
    # statistics only count signs of act(gate): bfloat16 weights are ~2.5x faster on CPUs with
    # native bf16 (avx512_bf16 / AMX), float32 elsewhere ("fast")
    "collect_dtype": "fast",
    # identify: 18 layers x 2048 neurons = 36,864 for Gemma-3-270M; 5% (the paper's upper end)
    # selects 1,843 language-specific neurons, a few hundred per language; 1% leaves too few
    # per language to train (tens).
    "top_rate": 0.05,
    "filter_rate": 0.95,
    "activation_bar_ratio": 0.95,
    # finetune: the same tokens, data order and seed for every method
    # 12 optimizer steps of one 256-token sequence: on 2 idle CPU cores a Gemma-3-270M step takes
    # about 3 s (neurons, random) and 9 s (full: AdamW over 268M parameters); the whole quick demo
    # about 6 minutes with the model and corpus cached
    "train_tokens": 3072,
    "seq_len": 256,
    "batch_size": 1,
    "train_val_tokens": 512,
    "eval_every": 4,  # validation points for the curves (0 = only at the end)
    "eval_at_start": True,  # step 0 too: the base model's validation perplexity
    "autocast": "auto",
    "lr": {},  # method -> lr; empty: the paper's defaults (1e-4 neurons/random/lora, 1e-5 full/ffn)
    "seed": 0,
    # eval: validation tokens per language, parallel sentences for alignment
    "eval_val_tokens": 512,
    "eval_batch_size": 2,
    "parallel_n": 16,
}

#: ``--full``: about two hours on 2 CPU cores (minutes on a GPU)
FULL: Dict[str, Any] = {
    **QUICK,
    "languages": ["en", "de", "fr", "es", "ru", "cy", "eu", "is", "ga", "ka", "mk", "gl"],
    "methods": ["neurons", "random", "lora", "ffn", "full"],
    "collect_tokens": 65536,
    "train_tokens": 32768,
    "batch_size": 4,  # 32 steps
    "train_val_tokens": 2048,
    "eval_every": 8,
    "eval_val_tokens": 4096,
    "parallel_n": 64,
}


def demo_settings(full: bool, config_path: Optional[str] = None, **overrides: Any) -> Dict[str, Any]:
    cfg = dict(FULL if full else QUICK)
    if config_path:
        extra = read_json(config_path)
        if not isinstance(extra, dict):
            raise ExperimentError(f"--config {config_path}: expected a JSON object")
        unknown = sorted(set(extra) - set(cfg))
        if unknown:
            raise ExperimentError(f"--config {config_path}: unknown settings {unknown}; known: {sorted(cfg)}")
        cfg.update(extra)
    for k, v in overrides.items():
        if v is not None:
            cfg[k] = v
    return cfg


def _approx_tokens(texts: Sequence[str]) -> int:
    """A cautious token estimate (about 3 characters per token for these languages)."""
    return sum(len(t) for t in texts) // 3


def choose_target(corpus: Dict[str, Any], languages: Sequence[str], need_train: int, need_val: int,
                  preferred: Optional[str] = None) -> str:
    """The first under-resourced language (TARGET_PREFERENCE order) with enough text for the
    training budget (no repetition) and the validation set."""
    if preferred is not None:
        if preferred not in languages:
            raise ExperimentError(f"--target {preferred!r} is not among the languages {', '.join(languages)}")
        return preferred
    for lang in TARGET_PREFERENCE:
        if lang in languages and lang != "en":
            if (_approx_tokens(corpus_texts(corpus, lang, "train")) >= need_train
                    and _approx_tokens(corpus_texts(corpus, lang, "validation")) >= need_val):
                return lang
    raise ExperimentError(f"none of the languages {', '.join(languages)} is an under-resourced language with "
                          f"{need_train} training tokens; pass --target")


def fast_dtype(device: str) -> str:
    """bfloat16 where the CPU (or a GPU) computes it natively, else float32."""
    from .runtime import parse_device

    if parse_device(device).type == "cuda":
        return "bfloat16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _say(msg: str) -> None:
    print(msg, flush=True)


def _finetune_subprocess(cfg: FinetuneConfig) -> None:
    """Each method trains in its own process: its peak memory is its own, not the demo's. The
    config travels as JSON on stdin (``python -m lape_kernels.experiment.finetune``)."""
    cmd = [sys.executable, "-m", "lape_kernels.experiment.finetune"]
    proc = subprocess.run(cmd, env=dict(os.environ), input=json.dumps(cfg.to_dict()), text=True)
    if proc.returncode != 0:
        raise ExperimentError(f"finetune --method {cfg.method} --language {cfg.language} -o {cfg.out} failed "
                              f"(exit {proc.returncode}); see above")


def _finished(cfg: FinetuneConfig) -> bool:
    """Is the run this config would produce already there? (No process, no model.)"""
    from .methods import settings_hash

    run_json = Path(cfg.out) / "run.json"
    if not run_json.exists():
        return False
    info = read_json(run_json)
    return bool(info.get("complete")) and info.get("config_hash") == settings_hash(cfg)[1]


def run_demo(full: bool = False, model: Optional[str] = None, data: Optional[str] = None, out: str = "reports/demo",
             target: Optional[str] = None, languages: Optional[Sequence[str]] = None,
             methods: Optional[Sequence[str]] = None, device: str = "auto", cache_dir: Optional[str] = None,
             fresh: bool = False, config_path: Optional[str] = None) -> Path:
    """Run the experiment; returns the path of report.md."""
    from .collect import collect, identify_neurons
    from .evaluate import Evaluator
    from .runs import load_run_info
    from .report import claims, write_report

    cfg = demo_settings(full, config_path, model=model, languages=list(languages) if languages else None,
                        methods=list(methods) if methods else None)
    if len(set(cfg["languages"])) < 2:
        raise ExperimentError("the demo needs at least two languages")
    out_dir = Path(out)
    stats_dir, neurons_dir = out_dir / "stats", out_dir / "neurons"
    runs_dir, eval_dir = out_dir / "runs", out_dir / "eval"
    if fresh:
        for p in (stats_dir, neurons_dir, runs_dir, eval_dir, partial_path(stats_dir)):
            if p.exists():
                remove_path(p)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: Dict[str, Any] = {}  # stage -> (wall seconds, CPU seconds incl. child processes)
    t_all, c_all = now(), cpu_seconds()

    _say(f"[1/6] corpus and model: {cfg['model']}, languages {' '.join(cfg['languages'])}")
    t, c = now(), cpu_seconds()
    corpus = load_corpus(data, cfg["languages"], cache_dir=cache_dir)
    tgt = choose_target(corpus, cfg["languages"], cfg["train_tokens"], cfg["eval_val_tokens"], target)
    # what a cached evaluation was measured on, by content (an edited text is measured again)
    val_digests = validation_digests(corpus, cfg["languages"] + ([tgt] if tgt not in cfg["languages"] else []))
    del corpus
    _say(f"      target language: {tgt}")
    timings["corpus"] = (now() - t, cpu_seconds() - c)

    _say(f"[2/6] collect LAPE statistics: {cfg['collect_tokens']} tokens x {len(cfg['languages'])} languages")
    t, c = now(), cpu_seconds()
    collect(cfg["model"], cfg["languages"], str(stats_dir), data=data, tokens=cfg["collect_tokens"],
            seq_len=cfg["collect_seq_len"], batch_size=cfg["collect_batch_size"], device=device,
            dtype=fast_dtype(device) if cfg["collect_dtype"] == "fast" else cfg["collect_dtype"], cache_dir=cache_dir,
            replace_other_settings=True)  # the demo's own stage output
    gc.collect()
    timings["collect"] = (now() - t, cpu_seconds() - c)

    _say(f"[3/6] identify language neurons (top_rate {cfg['top_rate']})")
    t, c = now(), cpu_seconds()
    ns = identify_neurons([str(stats_dir)], str(neurons_dir), top_rate=cfg["top_rate"], filter_rate=cfg["filter_rate"],
                          activation_bar_ratio=cfg["activation_bar_ratio"], overwrite=True)  # the demo's own
    _say("      neurons per language: " + ", ".join(f"{l} {ns.total(l)}" for l in ns.languages))
    if ns.total(tgt) == 0:
        raise ExperimentError(f"no neurons identified for the target {tgt}; raise top_rate")
    timings["identify"] = (now() - t, cpu_seconds() - c)

    steps = -(-cfg["train_tokens"] // (cfg["batch_size"] * cfg["seq_len"]))
    eval_every = cfg["eval_every"] or steps
    _say(f"[4/6] fine-tune {tgt}: {', '.join(cfg['methods'])}; {steps} steps x {cfg['batch_size']} x "
         f"{cfg['seq_len']} tokens each")
    runs: Dict[str, Dict[str, Any]] = {}
    for method in cfg["methods"]:
        t, c = now(), cpu_seconds()
        ft = FinetuneConfig(
            model=cfg["model"], language=tgt, method=method, out=str(runs_dir / method), data=data or None,
            neurons=str(neurons_dir) if method in ("neurons", "random") else None, steps=steps,
            lr=float(cfg["lr"][method]) if method in cfg["lr"] else None, seq_len=cfg["seq_len"],
            batch_size=cfg["batch_size"], eval_every=eval_every, eval_at_start=bool(cfg["eval_at_start"]),
            val_tokens=cfg["train_val_tokens"], seed=cfg["seed"], device=device, autocast=cfg["autocast"],
            cache_dir=cache_dir or None)
        run_json = runs_dir / method / "run.json"
        if _finished(ft):
            # same settings: the run itself compares the inputs' content (text, model, neurons),
            # reusing the result when they are unchanged and recomputing it when they were edited
            before = run_json.read_bytes()
            _finetune_subprocess(ft)
            _say(f"      {method}: reusing {runs_dir / method} (same settings, same inputs)"
                 if run_json.read_bytes() == before else
                 f"      {method}: {runs_dir / method} recomputed (its inputs changed since)")
        else:
            # nothing there, or a run of other settings (the demo's own output): replaced
            _finetune_subprocess(dataclasses.replace(ft, overwrite=(runs_dir / method).exists()))
        runs[method] = load_run_info(runs_dir / method)
        timings[f"finetune {method}"] = (now() - t, cpu_seconds() - c)

    _say(f"[5/6] evaluate: {len(cfg['languages'])} languages x {cfg['eval_val_tokens']} tokens, before and after")
    t, c = now(), cpu_seconds()
    evals: Dict[str, Dict[str, Any]] = {}
    ev = None
    for method in cfg["methods"]:
        path = eval_dir / f"{method}.json"
        if path.exists():
            cached = read_json(path)
            if (cached.get("run", {}).get("config_hash") == runs[method]["config_hash"]
                    and cached.get("run", {}).get("inputs") == runs[method].get("inputs")
                    and cached.get("settings", {}).get("validation_text") == val_digests
                    and cached.get("settings", {}).get("val_tokens") == cfg["eval_val_tokens"]
                    and cached.get("settings", {}).get("languages") == list(cfg["languages"])
                    and cached.get("settings", {}).get("parallel_n") == cfg["parallel_n"]):
                evals[method] = cached
                continue
        if ev is None:
            ev = Evaluator(cfg["model"], data, cfg["languages"], tgt, seq_len=cfg["seq_len"],
                           val_tokens=cfg["eval_val_tokens"], batch_size=cfg["eval_batch_size"],
                           parallel_n=cfg["parallel_n"], device=device, cache_dir=cache_dir)
        evals[method] = ev.after(str(runs_dir / method))
        write_json_atomic(path, evals[method])
    del ev
    gc.collect()
    timings["evaluate"] = (now() - t, cpu_seconds() - c)

    _say("[6/6] report")
    logs = {m: [json.loads(l) for l in (runs_dir / m / "log.jsonl").read_text().splitlines() if l.strip()]
            for m in cfg["methods"]}
    e0 = next(iter(evals.values()))
    import torch

    setup = {
        "model": cfg["model"],
        "languages": ", ".join(cfg["languages"]),
        "target": tgt,
        "collect": f"{cfg['collect_tokens']:,} tokens per language, {cfg['collect_seq_len']}-token packed sequences, "
                   f"decoder body only",
        "identify": f"top_rate {cfg['top_rate']}, filter_rate {cfg['filter_rate']}, "
                    f"activation_bar_ratio {cfg['activation_bar_ratio']}",
        f"neurons of {tgt}": f"{ns.total(tgt):,} (of {ns.num_units:,})",  # dense + expert neurons
        "training": f"{steps} steps x {cfg['batch_size']} x {cfg['seq_len']} tokens = "
                    f"{steps * cfg['batch_size'] * cfg['seq_len']:,} tokens per method, same order (seed {cfg['seed']}); "
                    f"AdamW, wd 0.01, clip 1.0",
        "evaluation": f"{cfg['eval_val_tokens']:,} validation tokens per language ({e0['settings']['dtype']}); "
                      f"alignment on {e0['settings']['parallel_pairs']} {tgt}-en sentence pairs",
        "device": f"{runs[cfg['methods'][0]].get('device')}, {torch.get_num_threads()} threads",
    }
    timings["total"] = (now() - t_all, cpu_seconds() - c_all)
    report = write_report(out_dir, setup=setup, evals=evals, runs=runs, logs=logs, neuron_set=ns, timings=timings)
    summary = {
        "report": str(report),
        "target": tgt,
        "claims": claims(evals),
        "target_ppl": {m: {"before": evals[m]["before"]["ppl"][tgt], "after": evals[m]["after"]["ppl"][tgt],
                           "change": evals[m]["target_ppl_change"]} for m in evals},
        "other_ppl_abs_change_mean": {m: evals[m]["other_ppl_abs_change_mean"] for m in evals},
        "timings": timings,
        "settings": cfg,
    }
    write_json_atomic(out_dir / "summary.json", summary)
    for c in summary["claims"]:
        verdict = {True: "TRUE", False: "FALSE", None: "not measured"}[c["holds"]]
        _say(f"claim: {c['claim']}: {verdict} ({c['text']})")
    _say(f"done in {timings['total'][0]:.0f}s (CPU time {timings['total'][1]:.0f}s); report: {report}")
    return report
