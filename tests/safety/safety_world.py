"""The toy world of the CLI's safety tests, made once per session: model A, model B (same shape,
other weights), a corpus, and statistics, neurons and a run made on A.

The tests drive the CLI as a user does: ``main(argv)`` in this process (seconds) or
``python -m lape_kernels.cli`` in a fresh one where stderr, concurrency or warnings matter.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple

REPO = Path(__file__).resolve().parents[2]


class World:
    """Paths of the toy world plus ways to run the CLI on it."""

    LANGS = ["aa", "bb"]
    SMALL = ["--seq-len", "64"]

    def __init__(self, root: Path):
        from lape_kernels.experiment.toy import make_toy_setup

        self.root = root
        self.model_a, self.corpus = map(Path, make_toy_setup(str(root / "a")))
        self.model_b = Path(make_toy_setup(str(root / "b"), seed=1, lines=40)[0])
        self.stats_a = root / "stats_a"
        self.neurons_a = root / "neurons_a"
        self.run_a = root / "run_a"
        self.ok(*self.collect_args(self.model_a, self.corpus, self.stats_a))
        self.ok("identify", str(self.stats_a), "--top-rate", "0.1", "-o", str(self.neurons_a))
        self.ok(*self.finetune_args(self.model_a, self.corpus, self.run_a))

    # ------------------------------------------------------------------ argument lists
    def collect_args(self, model, corpus, out, *extra, languages=None, tokens=1024) -> List[str]:
        return ["collect", "--model", str(model), "--data", str(corpus), "--languages", *(languages or self.LANGS),
                "--tokens", str(tokens), "--batch-size", "8", "--save-every", "1", "-o", str(out), *self.SMALL,
                *extra]

    def finetune_args(self, model, corpus, out, *extra, neurons=None, method="neurons", steps=2) -> List[str]:
        budget = [] if "--tokens" in extra else ["--steps", str(steps)]
        return ["finetune", "--model", str(model), "--data", str(corpus), "--language", "aa", "--method", method,
                "--neurons", str(neurons or self.neurons_a), *budget, "--batch-size", "4", "--eval-every", "2",
                "--val-tokens", "128", "-o", str(out), *self.SMALL, *extra]

    def eval_args(self, model, out, *extra, run=None) -> List[str]:
        return ["eval", "--model", str(model), "--data", str(self.corpus), "--languages", *self.LANGS,
                "--target", "aa", "--val-tokens", "128", "--parallel", "0", "-o", str(out), *self.SMALL,
                *(["--run", str(run)] if run else []), *extra]

    # ------------------------------------------------------------------ running
    @staticmethod
    def main(*argv: str) -> Tuple[int, str, str]:
        """(exit code, stdout, stderr) of ``lape_kernels.cli.main`` in this process."""
        from lape_kernels.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(list(argv))
            except SystemExit as exc:  # argparse usage errors
                rc = exc.code
        return rc, out.getvalue(), err.getvalue()

    def ok(self, *argv: str) -> str:
        rc, out, err = self.main(*argv)
        assert rc == 0, err
        return err

    @staticmethod
    def popen(*argv: str, env: Optional[dict] = None) -> subprocess.Popen:
        """``python -m lape_kernels.cli ARGV`` in a fresh process (stdout, stderr piped)."""
        e = dict(os.environ)
        e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
        e.pop("LAPE_KERNELS_DEBUG", None)
        e.update(env or {})
        return subprocess.Popen([sys.executable, "-m", "lape_kernels.cli", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=e, cwd=str(REPO))

    def process(self, *argv: str) -> Tuple[int, str, str]:
        p = self.popen(*argv)
        out, err = p.communicate(timeout=300)
        return p.returncode, out, err

    def interrupted_collect(self, args: List[str], monkeypatch) -> None:
        """Run `collect ARGS` stopped by Ctrl-C after its first saved chunk: `.X.partial` remains."""
        import lape_kernels.stats as st

        orig, calls = st.record, {"n": 0}

        def flaky(*a, **k):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            return orig(*a, **k)

        monkeypatch.setattr(st, "record", flaky)
        rc = self.main(*args)[0]
        monkeypatch.setattr(st, "record", orig)
        assert rc == 130

    def corpus_copy(self, where: Path) -> Path:
        shutil.copytree(self.corpus, where)
        return where


def one_line_error(err: str, *needles: str) -> str:
    """The CLI's failure contract: exactly one non-empty stderr line, ``... error: ...``,
    containing every needle; returns it."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "error:" in lines[0] and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def leftovers(path: Path) -> List[str]:
    """Hidden siblings a command leaves beside its output (partials, temporaries, locks)."""
    path = Path(path)
    if not path.parent.exists():
        return []
    return sorted(p.name for p in path.parent.iterdir()
                  if p.name.startswith(f".{path.name}") or p.name.startswith(f".{path.stem}."))
