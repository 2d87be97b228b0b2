"""``lape-kernels``: collect, identify, finetune, eval, demo.

Every failure exits non-zero with one line on stderr (``lape-kernels <cmd>: error: ...``) and
no traceback (set ``LAPE_KERNELS_DEBUG=1`` for one); outputs are written under a temporary name
and renamed into place only when complete, so a failed command never leaves a half-written
output at the path it was given.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, List, Optional

__all__ = ["main", "build_parser"]

PROG = "lape-kernels"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (exit 2), like every other failure."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not (0.0 < v <= 1.0):
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {v}")
    return v


def _common_model(p: argparse.ArgumentParser, required: bool = True, default: Optional[str] = None) -> None:
    p.add_argument("--model", required=required, default=default,
                   help="model alias (gemma3-270m, smollm2-135m), local path or HF id")
    p.add_argument("--data", default=None,
                   help="corpus: 'builtin' (default; the offline corpus lape_kernels builds) or a dataset path/spec")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="weights: auto (collect: float32 on CPU, bfloat16 on CUDA; "
                                                  "finetune/eval: float32), float32, bfloat16, float16")
    p.add_argument("--cache-dir", default=None, help="where converted models / the built corpus are cached")


def build_parser() -> argparse.ArgumentParser:
    from .experiment.finetune import METHODS

    parser = _Parser(prog=PROG, description="LAPE language neurons: collect statistics, identify neurons, "
                                            "fine-tune a language's neurons, evaluate, or run the whole demo.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("collect", help="per-language LAPE activation statistics")
    _common_model(p)
    p.add_argument("--languages", nargs="+", required=True, metavar="LANG")
    p.add_argument("--tokens", type=_positive_int, default=100_000, help="tokens per language (packed; default 100000)")
    p.add_argument("--seq-len", type=_positive_int, default=512)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--save-every", type=_positive_int, default=20, help="save resumable state every N batches")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("-o", "--out", required=True, metavar="STATS_DIR")

    p = sub.add_parser("identify", help="LAPE language neurons from collected statistics")
    p.add_argument("stats", nargs="+", metavar="STATS", help="collect output directories or stats files")
    p.add_argument("--languages", nargs="+", default=None, metavar="LANG", help="use (and order) these languages")
    p.add_argument("--top-rate", type=_rate, default=0.01)
    p.add_argument("--filter-rate", type=_rate, default=0.95)
    p.add_argument("--activation-bar-ratio", type=_rate, default=0.95)
    p.add_argument("--format", choices=("lape", "reference"), default="lape",
                   help="lape: directory (or .json/.safetensors pair) with names and metadata; "
                        "reference: the LAPE reference's torch.save list[lang][layer]")
    p.add_argument("-o", "--out", required=True, metavar="NEURONS")

    p = sub.add_parser("finetune", help="train one language with one method")
    _common_model(p)
    p.add_argument("--language", required=True)
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--neurons", default=None, help="neuron set (for --method neurons / random)")
    p.add_argument("--neuron-languages", nargs="+", default=None, metavar="LANG",
                   help="names of the languages of a LAPE reference-format neuron file, in file order")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--tokens", type=_positive_int, help="training tokens (rounded up to whole steps)")
    budget.add_argument("--steps", type=_positive_int)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-4 neurons/random/lora, 1e-5 full/ffn")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    p.add_argument("--recompute", default="none", choices=("none", "up", "gate_up"),
                   help="neurons/random: recompute these MLP projections in backward instead of keeping them "
                        "(less memory, one or two more GEMMs per layer; same results)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--seq-len", type=_positive_int, default=512)
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--lora-r", type=_positive_int, default=32)
    p.add_argument("--lora-alpha", type=_positive_int, default=64)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--eval-every", type=_positive_int, default=50, help="validate every N steps (and at the end)")
    p.add_argument("--eval-at-start", action="store_true", help="also validate before the first step")
    p.add_argument("--val-tokens", type=_positive_int, default=16384)
    p.add_argument("--eval-batch-size", type=_positive_int, default=None)
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default: --eval-every; 0 = off)")
    p.add_argument("--autocast", default="auto", help="bf16/fp16 matmuls over float32 weights: auto (bf16 on CUDA, "
                                                        "none on CPU), none, bf16, fp16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-after-steps", type=_positive_int, default=None,
                   help="checkpoint and stop after N steps (exit 3); rerunning resumes (simulates an interruption)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-o", "--out", required=True, metavar="RUN_DIR")

    p = sub.add_parser("eval", help="before/after perplexity, alignment and update norms of a run")
    _common_model(p)
    p.add_argument("--run", default=None, metavar="RUN_DIR", help="a finetune output (omit: the base model only)")
    p.add_argument("--languages", nargs="+", required=True, metavar="LANG")
    p.add_argument("--target", required=True)
    p.add_argument("--seq-len", type=_positive_int, default=512)
    p.add_argument("--val-tokens", type=_positive_int, default=8192, help="validation tokens per language")
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--parallel", type=int, default=32, help="parallel sentence pairs for alignment (0 = skip)")
    p.add_argument("--align-with", default="en")
    p.add_argument("--autocast", default="none", help="none (default: float32, so small updates stay visible), bf16, fp16")
    p.add_argument("-o", "--out", required=True, metavar="EVAL_JSON")

    p = sub.add_parser("demo", help="the experiment end to end, with a report")
    p.add_argument("--full", action="store_true", help="all five methods and larger budgets")
    p.add_argument("--model", default=None, help="default: gemma3-270m")
    p.add_argument("--data", default=None)
    p.add_argument("--out", default="reports/demo")
    p.add_argument("--target", default=None, help="target language (default: the first under-resourced one with enough text)")
    p.add_argument("--languages", nargs="+", default=None, metavar="LANG")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--fresh", action="store_true", help="ignore results of an earlier demo in --out")
    p.add_argument("--config", default=None, help="JSON file overriding budget settings (see lape_kernels.experiment.demo)")
    return parser


def finetune_config(args: Any):
    """The ``FinetuneConfig`` of parsed ``finetune`` arguments (or of an argument list)."""
    from .experiment.finetune import FinetuneConfig

    if isinstance(args, (list, tuple)):
        args = build_parser().parse_args(["finetune", *args])
    return FinetuneConfig(
        model=args.model, language=args.language, method=args.method, out=args.out, data=args.data,
        neurons=args.neurons, neuron_languages=args.neuron_languages, tokens=args.tokens, steps=args.steps,
        lr=args.lr, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, warmup_steps=args.warmup_steps, seq_len=args.seq_len,
        batch_size=args.batch_size, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, eval_every=args.eval_every, eval_at_start=args.eval_at_start,
        val_tokens=args.val_tokens, eval_batch_size=args.eval_batch_size, save_every=args.save_every,
        seed=args.seed, device=args.device, dtype=args.dtype, autocast=args.autocast, cache_dir=args.cache_dir,
        stop_after_steps=args.stop_after_steps, overwrite=args.overwrite, recompute=args.recompute)


def _run(args: argparse.Namespace) -> int:
    if args.command == "collect":
        from .experiment.collect import collect

        collect(args.model, args.languages, args.out, data=args.data, tokens=args.tokens, seq_len=args.seq_len,
                batch_size=args.batch_size, device=args.device, dtype=args.dtype, save_every=args.save_every,
                cache_dir=args.cache_dir, overwrite=args.overwrite)
        print(args.out)
        return 0
    if args.command == "identify":
        from .experiment.collect import identify_neurons
        from .neurons import per_layer_table

        ns = identify_neurons(args.stats, args.out, top_rate=args.top_rate, filter_rate=args.filter_rate,
                              activation_bar_ratio=args.activation_bar_ratio, format=args.format,
                              languages=args.languages)
        print(per_layer_table(ns), end="")
        print("languages (file order): " + ", ".join(ns.languages))
        print(args.out)
        return 0
    if args.command == "finetune":
        from .experiment.finetune import finetune

        cfg = finetune_config(args)
        summary = finetune(cfg)
        print(f"trainable parameters: {summary['trainable_params']:,} of {summary['total_params']:,} "
              f"({100 * summary['trainable_fraction']:.4f}%)")
        print(args.out)
        return 0
    if args.command == "eval":
        from .experiment.evaluate import evaluate, write_eval

        result = evaluate(args.model, args.data, args.languages, args.target, args.run, seq_len=args.seq_len,
                          val_tokens=args.val_tokens, batch_size=args.batch_size, parallel_n=args.parallel,
                          align_with=args.align_with, device=args.device, dtype=args.dtype,
                          autocast=args.autocast, cache_dir=args.cache_dir)
        write_eval(result, args.out)
        t = args.target
        line = f"{t}: ppl before {result['before']['ppl'][t]:.3f}"
        if "after" in result:
            line += f", after {result['after']['ppl'][t]:.3f} ({100 * result['target_ppl_change']:+.2f}%)"
        print(line)
        print(args.out)
        return 0
    if args.command == "demo":
        from .experiment.demo import run_demo

        report = run_demo(full=args.full, model=args.model, data=args.data, out=args.out, target=args.target,
                          languages=args.languages, methods=args.methods, device=args.device,
                          cache_dir=args.cache_dir, fresh=args.fresh, config_path=args.config)
        print(f"report: {report}")
        return 0
    raise AssertionError(args.command)  # pragma: no cover


def _quiet_libraries() -> None:
    """Our own tqdm bars report progress; silence the libraries' per-file bars and warnings."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except Exception:  # pragma: no cover - optional nicety
        pass
    try:
        from transformers.utils import logging as tf_logging

        tf_logging.disable_progress_bar()
        tf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{PROG} {args.command}"
    try:
        if not os.environ.get("LAPE_KERNELS_DEBUG"):
            _quiet_libraries()
        return _run(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (a rerun of the same command resumes where a checkpoint exists)", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except BaseException as exc:  # one line, no traceback: the contract of every subcommand
        if os.environ.get("LAPE_KERNELS_DEBUG"):
            raise
        from .experiment.common import Interrupted, one_line

        code = exc.exit_code if isinstance(exc, Interrupted) else 1
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
