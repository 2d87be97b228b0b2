"""``collect``: LAPE activation statistics per language; ``identify``: neuron sets from them.

Why packing and the decoder body: LAPE only needs the MLP activations, so the LM head (the
largest matmul of a small multilingual model: 262k x 640 for Gemma-3-270M) is never run, and
fixed-length packed sequences waste nothing on padding.

Resumability: each language's running totals are saved every ``save_every`` batches in
``.<STATS_DIR>.partial/<lang>.safetensors`` with ``meta["sequences_done"]``; a rerun with the same
settings continues after the sequences already counted. The finished directory (a
``StatsByLanguage``: ``index.json`` + one file per language) appears only at the end.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..files import claim_output
from .errors import ExperimentError, one_line, reworded
from .inputs import corpus_texts, load_corpus, load_model, pack_split
from .outputs import config_hash, dumps, partial_path, publish, read_json, remove_path
from .progress import now, progress
from .runtime import dtype_name, parse_device, parse_dtype
from .safety import check_partial_inputs, damaged, input_record, reuse_complete, warn

__all__ = ["collect", "load_stats", "identify_neurons", "STATS_INDEX"]

STATS_INDEX = "index.json"


def _stem(lang: str, i: int) -> str:
    from ..stats.values import safe_file_stem

    return safe_file_stem(lang, i)


def collect(model: str, languages: Sequence[str], out: str, *, data: Optional[str] = None, tokens: int = 100_000,
            seq_len: int = 512, batch_size: int = 8, device: str = "auto", dtype: str = "auto",
            save_every: int = 20, cache_dir: Optional[str] = None, overwrite: bool = False,
            quiet: bool = False, replace_other_settings: bool = False) -> Dict[str, Any]:
    """Count, per language, how often each MLP neuron fires on up to ``tokens`` training tokens.

    Returns ``{"out": path, "languages": ..., "tokens": {lang: n}, "seconds": s}``. The output is
    held for the whole run (``claim_output``: one process, never over an input or another
    command's output without ``overwrite``); a finished output of the same settings is reused
    only when its recorded inputs (text digests, model fingerprint) are the ones read now.

    Data-parallel inside a ``torch.distributed`` process group (``torchrun``): every rank packs
    the same sequences and counts batches ``j % world_size == rank`` of each save chunk; the
    chunk's counts are summed over ranks (``all_reduce``) before rank 0 saves them, so the
    result, and every resumable state, is the one-process one whatever the number of processes
    (a rerun may resume with another). Only rank 0 claims, reads and writes files.
    ``replace_other_settings``: the caller owns ``out`` (the demo's stage directory): a collection
    of other settings there is replaced instead of refused.
    """
    from .. import distributed

    languages = list(languages)
    if tokens <= 0 or seq_len < 2 or batch_size <= 0 or save_every <= 0:
        raise ExperimentError("--tokens, --batch-size and --save-every must be positive and --seq-len >= 2")
    out_path = Path(out)
    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    settings = {"model": model, "data": data or "builtin", "languages": languages, "tokens": tokens,
                "seq_len": seq_len, "dtype": dtype_name(dt)}
    digest = config_hash(settings)

    def same_settings(path: Path) -> Optional[str]:
        recorded = read_json(path / STATS_INDEX).get("collect", {}) if (path / STATS_INDEX).is_file() else None
        if recorded is None:
            return "not a finished collection"
        return None if recorded.get("config_hash") == digest else "collected with other settings"

    if replace_other_settings and out_path.is_dir() and same_settings(out_path) is not None:
        overwrite = True
    with contextlib.ExitStack() as held:
        def claim() -> None:  # rank 0 holds the output for every process (the others never write)
            held.enter_context(claim_output(out_path, inputs=[model, data], overwrite=overwrite,
                                            reusable=same_settings, command="collect"))

        distributed.run_on_main(claim)
        return _collect(model, languages, out_path, data=data, tokens=tokens, seq_len=seq_len,
                        batch_size=batch_size, dev=dev, dt=dt, save_every=save_every, cache_dir=cache_dir,
                        overwrite=overwrite, quiet=quiet or not distributed.is_main(), settings=settings,
                        digest=digest)


def _prepare(model_obj: Any, corpus: Any, languages: List[str], out_path: Path, *, overwrite: bool, quiet: bool,
             digest: str, settings: Dict[str, Any], world: int) -> Dict[str, Any]:
    """Rank 0's decisions before counting (files are its alone): reuse a finished output, start
    over, or resume ``.partial`` (whose totals, loaded into ``loaded``, are whole save chunks,
    summed over every process of the run that saved them: a rerun with another number of
    processes continues them exactly)."""
    from ..stats import ActivationStats

    inputs = input_record(model_obj, {lang: corpus_texts(corpus, lang, "train") for lang in languages})
    index = out_path / STATS_INDEX
    if index.is_file() and not overwrite:  # the same settings (claim_output refused others)
        recorded = read_json(index).get("collect", {})
        if reuse_complete(out_path, recorded.get("inputs"), inputs, quiet=quiet):
            return {"cached": recorded.get("tokens")}
    partial = partial_path(out_path)
    before = None
    if partial.exists():
        prev = partial / "config.json"
        try:
            recorded = read_json(prev) if prev.exists() else {}
        except ExperimentError as exc:
            raise damaged(exc, partial) from None
        if overwrite:
            remove_path(partial)
        elif recorded.get("config_hash") != digest:
            raise ExperimentError(f"{partial} holds an interrupted collection with other settings; pass "
                                  f"--overwrite to start over, or delete {partial}")
        else:
            check_partial_inputs(partial, recorded.get("inputs"), inputs, "collection")
            before = recorded.get("world_size", 1)
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "config.json").write_text(dumps({"config_hash": digest, "settings": settings, "inputs": inputs,
                                                "world_size": world}))
    loaded: Dict[str, ActivationStats] = {}
    for i, lang in enumerate(languages):
        f = partial / f"{_stem(lang, i)}.safetensors"
        if f.exists():
            try:
                loaded[lang] = ActivationStats.load(f)
            except (ValueError, OSError) as exc:
                raise damaged(exc, partial) from None
    resumed = {lang: int(s.meta.get("sequences_done", 0)) for lang, s in loaded.items()}
    if resumed and not quiet:
        note = "" if before in (None, world) else (f" (started with {before} processes, continued with {world}: "
                                                   f"the saved totals are whole chunks of sequences)")
        print(f"resuming collection from {partial}: " + ", ".join(f"{k} {v} seq" for k, v in resumed.items())
              + note, file=sys.stderr)
    return {"cached": None, "inputs": inputs, "resumed": resumed, "loaded": loaded}


def _collect(model: str, languages: List[str], out_path: Path, *, data: Optional[str], tokens: int, seq_len: int,
             batch_size: int, dev: torch.device, dt: torch.dtype, save_every: int, cache_dir: Optional[str],
             overwrite: bool, quiet: bool, settings: Dict[str, Any], digest: str) -> Dict[str, Any]:
    """``collect`` while rank 0 holds its output (see ``lape_kernels.files.claim_output``)."""
    from .. import api, distributed, introspection
    from ..stats import ActivationStats, StatsByLanguage, record

    rank, world = distributed.rank(), distributed.world_size()
    if save_every < world:
        warn(f"--save-every {save_every} is below the {world} processes: each save chunk has {save_every} batches, "
             f"so {world - save_every} processes wait in every chunk (use --save-every {world} or more)", quiet)
    # rank 0 first: whatever a download or conversion caches, it caches once
    corpus = distributed.main_first(lambda: load_corpus(data, languages, cache_dir=cache_dir))
    model_obj, tokenizer = distributed.main_first(lambda: load_model(model, dt, dev, cache_dir))
    packed = {lang: pack_split(tokenizer, corpus, lang, "train", seq_len, tokens) for lang in languages}
    for lang, ids in packed.items():
        if ids.numel() < tokens:
            warn(f"--tokens {tokens} is more than language {lang!r}'s train text holds ({ids.numel()} tokens "
                 f"packed); counting all of it", quiet)
    mine: Dict[str, Any] = {}  # rank 0's loaded partial totals (never sent to the others)

    def prepare() -> Dict[str, Any]:
        plan = _prepare(model_obj, corpus, languages, out_path, overwrite=overwrite, quiet=quiet, digest=digest,
                        settings=settings, world=world)
        mine.update(plan)
        return {k: plan[k] for k in ("cached", "resumed") if k in plan}

    plan = distributed.run_on_main(prepare)
    if plan["cached"] is not None:
        return {"out": str(out_path), "languages": languages, "tokens": plan["cached"], "seconds": 0.0, "cached": True}
    resumed: Dict[str, int] = plan["resumed"]
    results: Dict[str, ActivationStats] = mine.get("loaded", {})
    hidden = getattr(introspection.text_config(model_obj), "hidden_size", None)
    partial = partial_path(out_path)

    api.patch(model_obj, chunked_loss=False)
    body = introspection.decoder_body(model_obj)
    total_tokens = sum(int(v.numel()) for v in packed.values())
    done_tokens = sum(resumed.values()) * seq_len
    t0, cpu0 = now(), time.process_time()
    bar = progress(total_tokens, "collect" if world == 1 else f"collect x{world}", initial=done_tokens,
                   disable=rank != 0)
    try:
        for i, lang in enumerate(languages):
            ids = packed[lang]
            n_seq = ids.shape[0]
            f = partial / f"{_stem(lang, i)}.safetensors"
            bar.set_postfix(lang=lang)
            pos = resumed.get(lang, 0)
            while pos < n_seq:
                chunk_end = min(n_seq, pos + save_every * batch_size)
                with torch.inference_mode(), record(model_obj, languages=lang) as s:
                    # round r: batches r*world .. r*world + world-1 of the chunk, this rank's is +rank
                    for r0 in range(pos, chunk_end, batch_size * world):
                        b = r0 + rank * batch_size
                        if b < chunk_end:
                            body(input_ids=ids[b:min(b + batch_size, chunk_end)].to(dev))
                        bar.update(int(ids[r0:min(r0 + batch_size * world, chunk_end)].numel()))
                chunk = s.all_reduce() if world > 1 else s  # every rank's share of the chunk
                if rank == 0:
                    total = chunk if lang not in results else results[lang] + chunk
                    total.meta.update({
                        "language": lang, "model_id": model, "hidden_size": hidden, "seq_len": seq_len,
                        "sequences_done": chunk_end, "sequences_total": n_seq, "complete": chunk_end == n_seq,
                        "collect_config_hash": digest, "dtype": dtype_name(dt), "world_size": world,
                    })
                    tmp = f.with_name(f".{f.name}.tmp")
                    total.save(tmp)
                    os.replace(tmp, f)
                    results[lang] = total
                pos = chunk_end
            if rank == 0 and lang not in results:  # resumed with nothing left to do and no file (cannot happen)
                raise ExperimentError(f"internal: no statistics for {lang}")
    finally:
        bar.close()
    seconds = now() - t0
    # each rank's CPU seconds in the loop (how evenly the work split; robust to a shared machine)
    mine_cpu = torch.zeros(world, dtype=torch.float64)
    mine_cpu[rank] = time.process_time() - cpu0
    cpu_seconds = [round(float(v), 3) for v in distributed.all_reduce_sum([mine_cpu])[0]]
    return distributed.run_on_main(lambda: _publish(results, languages, out_path, partial, digest=digest,
                                                    settings=settings, inputs=mine["inputs"], seconds=seconds,
                                                    cpu_seconds=cpu_seconds,
                                                    done_tokens=done_tokens, world=world, quiet=quiet))


def _publish(results: Dict[str, Any], languages: List[str], out_path: Path, partial: Path, *, digest: str,
             settings: Dict[str, Any], inputs: Dict[str, Any], seconds: float, cpu_seconds: List[float],
             done_tokens: int, world: int, quiet: bool) -> Dict[str, Any]:
    """Rank 0: the finished ``StatsByLanguage`` directory in place of ``.partial``."""
    from ..stats import StatsByLanguage

    by_lang = StatsByLanguage(languages, {lang: results[lang] for lang in languages})
    tmp = out_path.parent / f".{out_path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        remove_path(tmp)
    try:
        by_lang.save(tmp)
        idx = read_json(tmp / STATS_INDEX)
        idx["collect"] = {"config_hash": digest, "settings": settings, "inputs": inputs,
                          "tokens": {lang: results[lang].n_tokens for lang in languages},
                          "seconds": seconds, "world_size": world, "cpu_seconds_per_rank": cpu_seconds}
        (tmp / STATS_INDEX).write_text(dumps(idx))
        publish(tmp, out_path)
    except BaseException:
        remove_path(tmp) if tmp.exists() else None
        raise
    remove_path(partial)
    counted = sum(results[lang].n_tokens for lang in languages) - done_tokens
    if not quiet:
        rate = counted / seconds if seconds > 0 else float("nan")
        procs = f", {world} processes" if world > 1 else ""
        print(f"collected {len(languages)} languages, {sum(r.n_tokens for r in results.values())} tokens "
              f"({rate:.0f} tok/s{procs}) -> {out_path}", file=sys.stderr)
    return {"out": str(out_path), "languages": languages, "tokens": {l: results[l].n_tokens for l in languages},
            "seconds": seconds, "tokens_per_s": counted / seconds if seconds > 0 else None, "cached": False,
            "cpu_seconds_per_rank": cpu_seconds,
            "world_size": world}


def load_stats(paths: Sequence[str], languages: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``language -> ActivationStats`` from collect directories and/or single stats files
    (language from the file's meta, else its name). ``languages`` selects and orders them."""
    from ..stats import ActivationStats, StatsByLanguage

    stats: Dict[str, Any] = {}
    if not paths:
        raise ExperimentError("no statistics given")
    for p in paths:
        path = Path(p)
        with reworded(f"{path}: cannot read statistics", ValueError, TypeError, OSError, KeyError):
            if path.is_dir():
                if not (path / STATS_INDEX).exists():
                    hint = " (an interrupted collect keeps its state in a .partial folder; rerun it)" \
                        if partial_path(path).exists() else ""
                    raise ExperimentError(f"{path}: not a collect output (no {STATS_INDEX}){hint}")
                found = dict(StatsByLanguage.load(path))
            elif path.is_file():
                s = ActivationStats.load(path)
                lang = s.meta.get("language") or path.stem
                found = {lang: s}
            else:
                raise ExperimentError(f"{path}: no such statistics file or directory")
        for lang, s in found.items():
            if lang in stats:
                raise ExperimentError(f"language {lang!r} appears in more than one statistics input")
            stats[lang] = s
    if languages is not None:
        missing = [l for l in languages if l not in stats]
        if missing:
            raise ExperimentError(f"no statistics for {', '.join(missing)} (have {', '.join(stats)})")
        stats = {l: stats[l] for l in languages}
    if len(stats) < 2:
        raise ExperimentError(f"identification needs statistics of at least 2 languages, got {list(stats)}")
    return stats


def identify_neurons(stats_paths: Sequence[str], out: str, *, top_rate: float = 0.01, filter_rate: float = 0.95,
                     activation_bar_ratio: float = 0.95, format: str = "lape",
                     languages: Optional[Sequence[str]] = None, overwrite: bool = False):
    """Run LAPE identification and write the NeuronSet atomically. Returns the NeuronSet.

    An existing output is replaced only with ``overwrite``; an output that is, is inside or
    contains one of the statistics is refused (see ``lape_kernels.files.claim_output``)."""
    if format not in ("lape", "reference"):
        raise ExperimentError(f"--format must be lape or reference, got {format!r}")
    out_path = Path(out)
    suffix = out_path.suffix if format == "lape" and out_path.suffix in (".json", ".safetensors") else ""
    pair = [out_path.with_suffix(".json" if suffix == ".safetensors" else ".safetensors")] if suffix else []
    with claim_output(out_path, inputs=stats_paths, overwrite=overwrite, is_dir=format == "lape" and not suffix,
                      also=pair, command="identify"):
        return _identify(stats_paths, out_path, suffix, top_rate=top_rate, filter_rate=filter_rate,
                         activation_bar_ratio=activation_bar_ratio, format=format, languages=languages)


def _identify(stats_paths: Sequence[str], out_path: Path, suffix: str, *, top_rate: float, filter_rate: float,
              activation_bar_ratio: float, format: str, languages: Optional[Sequence[str]]):
    from ..neurons import identify

    stats = load_stats(stats_paths, languages)
    try:
        ns = identify(stats, top_rate=top_rate, filter_rate=filter_rate, activation_bar_ratio=activation_bar_ratio)
    except (ValueError, TypeError) as exc:
        raise ExperimentError(f"identify: {one_line(exc)}") from None
    if format == "reference" and ns.has_experts:
        raise ExperimentError(f"--format reference: the LAPE reference format (list[language][layer]) has no expert "
                              f"neurons, and these statistics come from a mixture-of-experts model (MoE layers "
                              f"{list(ns.expert_layers)}); write --format lape")
    tmp = out_path.parent / f".{out_path.stem}.tmp-{os.getpid()}{suffix}"
    try:
        if format == "reference":
            ns.save(tmp, format="reference")
            publish(tmp, out_path)
        elif suffix:
            # a pair of files: publish the tensors first, the JSON (which names them) last
            ns.save(tmp, format="lape")
            tmp_tensors = tmp.with_suffix(".safetensors")
            tmp_json = tmp.with_suffix(".json")
            final_tensors = out_path.with_suffix(".safetensors")
            final_json = out_path.with_suffix(".json")
            meta = read_json(tmp_json)
            meta["tensors"] = final_tensors.name
            tmp_json.write_text(dumps(meta))
            os.replace(tmp_tensors, final_tensors)
            os.replace(tmp_json, final_json)
        else:
            ns.save(tmp, format="lape")
            publish(tmp, out_path)
    finally:
        for t in (tmp, tmp.with_suffix(".safetensors") if suffix else None, tmp.with_suffix(".json") if suffix else None):
            if t is not None and (t.exists() or t.is_symlink()):
                remove_path(t)
    return ns
