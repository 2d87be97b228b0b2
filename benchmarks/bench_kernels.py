"""Microbenchmarks of the CPU kernels (pytest-benchmark), at SmolLM2-135M's MLP width (I=1536).

    .venv/bin/python -m pytest benchmarks/bench_kernels.py --benchmark-only \
        --benchmark-group-by=param:dtype,param:T --benchmark-columns=min,median,mean,rounds
    .venv/bin/python benchmarks/bench_kernels.py          # same, with those options

LAPE_BENCH_THREADS=N sets torch's thread count. On a busy machine, time one thread with CPU time
(``LAPE_BENCH_THREADS=1 ... --benchmark-timer=time.process_time``): wall-clock timings of
OpenMP threads that get descheduled say little about the kernels.

Per (dtype, T), side by side:
  torch_silu_mul        F.silu(g) * u, the unpatched MLP's activation
  torch_silu_mul_hook   that plus LAPE's hook-style counting: (act > 0).sum(0) and act.sum(0)
  op_act_mul            lape_kernels act_mul (the patched forward without counting)
  op_act_mul_count      act_mul_count, one language (token_lang=None)
  op_act_mul_count_4    act_mul_count, 4 languages from a token_lang vector
  reference_count       reference.act_mul_count (the plain-PyTorch oracle)
  torch_silu_mul_bwd / op_act_mul_backward: gradient of silu(g) * u via autograd vs the op
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from lape_kernels.kernels import ops
from lape_kernels.kernels import reference as ref

if os.environ.get("LAPE_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["LAPE_BENCH_THREADS"]))

I = 1536
SHAPES = (512, 2048)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _inputs(T, dtype):
    gen = torch.Generator().manual_seed(0)
    gate = (torch.randn(T, I, generator=gen) * 2).to(dtype)
    up = torch.randn(T, I, generator=gen).to(dtype)
    langs = torch.arange(T) * 4 // T  # 4 contiguous runs, as a batch of sequences gives
    grad = torch.randn(T, I, generator=gen).to(dtype)
    return gate, up, langs, grad


def _hook_style(gate, up):
    act = F.silu(gate)
    h = act * up
    return h, (act > 0).sum(0), act.float().sum(0, dtype=torch.float64)


def _autograd_bwd(gate, up, grad):
    g = gate.detach().requires_grad_(True)
    u = up.detach().requires_grad_(True)
    return torch.autograd.grad(F.silu(g) * u, (g, u), grad)


CASES = {
    "torch_silu_mul": lambda g, u, langs, grad: F.silu(g) * u,
    "torch_silu_mul_hook": lambda g, u, langs, grad: _hook_style(g, u),
    "op_act_mul": lambda g, u, langs, grad: ops.act_mul(g, u, "silu"),
    "op_act_mul_count": lambda g, u, langs, grad: ops.act_mul_count(g, u, "silu", None, 1),
    "op_act_mul_count_4": lambda g, u, langs, grad: ops.act_mul_count(g, u, "silu", langs, 4),
    "reference_count": lambda g, u, langs, grad: ref.act_mul_count(g, u, "silu", langs, 4),
    "torch_silu_mul_bwd": lambda g, u, langs, grad: _autograd_bwd(g, u, grad),
    "op_act_mul_backward": lambda g, u, langs, grad: ops.act_mul_backward(grad, g, u, "silu"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("T", SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_kernel(benchmark, dtype, T, case):
    gate, up, langs, grad = _inputs(T, DTYPES[dtype])
    fn = CASES[case]
    benchmark.group = f"{dtype} T={T} I={I} threads={torch.get_num_threads()} cpu={ops.cpu_kernels}"
    benchmark.extra_info.update(dtype=dtype, T=T, I=I)
    benchmark(fn, gate, up, langs, grad)


if __name__ == "__main__":
    sys.exit(
        pytest.main(
            [__file__, "-q", "-p", "no:cacheprovider", "--benchmark-only",
             "--benchmark-columns=min,median,mean,rounds", "--benchmark-sort=name", *sys.argv[1:]]
        )
    )
