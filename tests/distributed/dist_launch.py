"""Starting commands as a user does: ``torchrun --nproc_per_node N lape-kernels ...`` (CPU, gloo,
one thread per process), plus the toy model and corpus shared by the distributed tests.

``torchrun`` is the venv's own (next to this Python), with ``--standalone`` (a free local
rendezvous port: tests running side by side never race for 29500).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def cli_command() -> List[str]:
    """The ``lape-kernels`` console script of this venv when installed, else ``-m lape_kernels.cli``
    (what torchrun runs after its own options)."""
    script = BIN / "lape-kernels"
    return [str(script)] if script.exists() else ["-m", "lape_kernels.cli"]


def torchrun_command(nproc: int, args: Sequence[str], *, module_or_script: Optional[List[str]] = None) -> List[str]:
    launcher = [str(BIN / "torchrun")] if (BIN / "torchrun").exists() else [sys.executable, "-m",
                                                                              "torch.distributed.run"]
    return [*launcher, "--standalone", "--nproc_per_node", str(nproc),
            *(module_or_script if module_or_script is not None else cli_command()), *map(str, args)]


def env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """This process's environment for a child: the repository first on PYTHONPATH, one thread
    per process, no launch variables inherited, no debug tracebacks."""
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LAPE_KERNELS_DEBUG")}
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e.update(extra or {})
    return e


def popen(nproc: int, args: Sequence[str], *, extra_env: Optional[Dict[str, str]] = None,
          module_or_script: Optional[List[str]] = None) -> subprocess.Popen:
    """``torchrun --nproc_per_node NPROC lape-kernels ARGS`` in its own session (so that
    :func:`kill_job` can kill -9 the launcher and every worker)."""
    return subprocess.Popen(torchrun_command(nproc, args, module_or_script=module_or_script), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(extra_env), cwd=str(REPO),
                            start_new_session=True)


def run(nproc: int, args: Sequence[str], *, timeout: float = 600, extra_env: Optional[Dict[str, str]] = None,
        module_or_script: Optional[List[str]] = None) -> subprocess.CompletedProcess:
    """:func:`popen` to the end: (returncode, stdout, stderr)."""
    p = popen(nproc, args, extra_env=extra_env, module_or_script=module_or_script)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(p)
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def run_one(args: Sequence[str], *, timeout: float = 600,
            extra_env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """The same command in one plain process (no torchrun), one thread."""
    return subprocess.run([sys.executable, *cli_command(), *map(str, args)], capture_output=True, text=True,
                          env=env(extra_env), cwd=str(REPO), timeout=timeout)


def kill_job(p: subprocess.Popen) -> Tuple[str, str]:
    """kill -9 of the launcher and every worker (each torchrun worker runs in its own session,
    so the whole process tree, as a batch scheduler's cancel does); (stdout, stderr) of the job
    until then."""
    import psutil

    try:
        tree = [psutil.Process(p.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for proc in tree:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    return p.communicate()
