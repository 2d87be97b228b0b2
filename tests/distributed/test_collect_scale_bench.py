"""``benchmarks/bench_scale.py`` runs end to end at a toy size and writes what it promises (no
timing asserted: the figures live in its report)."""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from dist_launch import REPO, env


@pytest.mark.slow  # 2 launches of collect (about 40 s on a loaded 2-core machine)
def test_bench_scale_reports_both_variants_and_equal_statistics(tmp_path):
    p = subprocess.run([sys.executable, "benchmarks/bench_scale.py", "--tokens", "2048", "--seq-len", "64",
                        "--layers", "2", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    md = (tmp_path / "results.md").read_text()
    assert "| 1 process | 1 |" in md and "| 2 processes | 2 |" in md
    assert "2 processes / 1 process: loop tokens/s" in md and "target: 2 processes >= 1.6x one process" in md
    assert "statistics: 2 processes vs 1 process: over_zero and n_tokens equal" in md
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["world_size"] for r in rows] == ["1", "2"] and all(float(r["loop_tok_s"]) > 0 for r in rows)
