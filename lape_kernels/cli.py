"""``lape-kernels``: collect, identify, finetune, eval, demo (``collect`` and ``finetune`` data-parallel
under ``torchrun``: ``lape_kernels.distributed``).

Every failure exits non-zero with one line on stderr (``lape-kernels <cmd>: error: ...``) and
no traceback (set ``LAPE_KERNELS_DEBUG=1`` for one); outputs are written under a temporary name
and renamed into place only when complete, so a failed command never leaves a half-written
output at the path it was given.

The options of each command are generated from its config dataclass
(``lape_kernels.experiment.config``): a new setting is a new field there, nothing here.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, List, Optional

__all__ = ["main", "build_parser"]

PROG = "lape-kernels"

#: command -> (config class name, help)
COMMANDS = {
    "collect": ("CollectConfig", "per-language LAPE activation statistics"),
    "identify": ("IdentifyConfig", "LAPE language neurons from collected statistics"),
    "finetune": ("FinetuneConfig", "train one language with one method"),
    "eval": ("EvalConfig", "before/after perplexity, alignment and update norms of a run"),
    "demo": ("DemoConfig", "the experiment end to end, with a report"),
}


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (exit 2), like every other failure."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from .experiment import config

    parser = _Parser(prog=PROG, description="LAPE language neurons: collect statistics, identify neurons, "
                                            "fine-tune a language's neurons, evaluate, or run the whole demo.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (cls, help_text) in COMMANDS.items():
        config.add_options(sub.add_parser(name, help=help_text), getattr(config, cls))
    return parser


def _run(command: str, cfg: Any) -> int:
    if command == "collect":
        from .experiment.collect import collect

        collect(**cfg.to_dict())
        print(cfg.out)
        return 0
    if command == "identify":
        from .experiment.collect import identify_neurons
        from .neurons import per_layer_table

        ns = identify_neurons(cfg.stats, cfg.out, top_rate=cfg.top_rate, filter_rate=cfg.filter_rate,
                              activation_bar_ratio=cfg.activation_bar_ratio, format=cfg.format,
                              languages=cfg.languages, overwrite=cfg.overwrite)
        print(per_layer_table(ns), end="")
        print("languages (file order): " + ", ".join(ns.languages))
        print(cfg.out)
        return 0
    if command == "finetune":
        from .experiment.finetune import finetune, summary_lines

        print(summary_lines(finetune(cfg), cfg))
        return 0
    if command == "eval":
        from .experiment.evaluate import evaluate_config

        result = evaluate_config(cfg)
        t = cfg.target
        line = f"{t}: ppl before {result['before']['ppl'][t]:.3f}"
        if "after" in result:
            line += f", after {result['after']['ppl'][t]:.3f} ({100 * result['target_ppl_change']:+.2f}%)"
        print(line)
        print(cfg.out)
        return 0
    if command == "demo":
        from .experiment.demo import run_demo

        print(f"report: {run_demo(**cfg.to_dict())}")
        return 0
    raise AssertionError(command)  # pragma: no cover


#: commands that run data-parallel under ``torchrun`` / ``accelerate launch`` (README: Multi-GPU)
DISTRIBUTED = ("collect", "finetune")


def _run_launched(command: str, cfg: Any) -> int:
    """``_run`` inside the process group of a distributed launch (``lape_kernels.distributed``;
    nothing changes without one). Commands that do not split their work refuse a launch of more
    than one process (each would do all of it and write the same output)."""
    from . import distributed
    from .experiment.errors import ExperimentError
    from .experiment.runtime import parse_device

    try:
        launch = distributed.launch_env()
        if launch is not None and launch.world_size > 1 and command not in DISTRIBUTED:
            raise ExperimentError(f"{command} runs in one process, not under torchrun with {launch.world_size} "
                                  f"processes (only {' and '.join(DISTRIBUTED)} split their work); run it without "
                                  f"torchrun")
        if launch is None or command not in DISTRIBUTED:
            return _run(command, cfg)
        with distributed.launched(parse_device(cfg.device)):
            return _run(command, cfg) if distributed.is_main() else _quiet(lambda: _run(command, cfg))
    except distributed.StoppedWithMain:
        return 1  # rank 0 printed the reason: one line for the job, not one per process
    except distributed.DistributedError as exc:
        raise ExperimentError(str(exc)) from None


def _quiet(work: Any) -> int:
    """Ranks other than 0 print nothing on stdout (the output paths and summaries are rank 0's);
    warnings and errors on stderr stay."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return work()


def main(argv: Optional[List[str]] = None) -> int:
    from .experiment import config
    from .experiment.errors import run_reporting

    args = build_parser().parse_args(argv)
    cfg = config.from_args(getattr(config, COMMANDS[args.command][0]), args)
    return run_reporting(f"{PROG} {args.command}", lambda: _run_launched(args.command, cfg))


if __name__ == "__main__":
    sys.exit(main())
