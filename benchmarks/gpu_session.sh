#!/usr/bin/env bash
# One prepared GPU session (a lent H100/H200): build the CUDA extension, run the CUDA/Triton
# tests, then the benchmarks; every step is time-boxed and logged under $OUT so a failing step
# never hides the others. Usage: bash benchmarks/gpu_session.sh [steps...]  (default: all)
# The steps are ordered by what is least verified (the CUDA C++ build and its tests first) and take
# up to ~15 min in all, over the device tool's 10-minute limit per call: run them as two calls,
# `... build tests kernels` then `... collect train scale` (build outputs stay on the warm machine).
set -u
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} LAPE_KERNELS_CPU_ISAS=default TORCH_CUDA_ARCH_LIST=9.0
MASKS=${MASKS:-.devshare/released-masks/llama-3.1-5}
[ -f "$MASKS" ] || MASKS=../shared/data/released-masks/llama-3.1-5
STEPS=${*:-build tests kernels collect train scale}
step() { local name=$1 limit=$2; shift 2; echo "=== $name (limit ${limit}s)"; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/.step.log" 2>&1; local rc=$?; echo "=== $name rc=$rc $((SECONDS-t0))s"
  { echo "=== $name rc=$rc"; cat "$OUT/.step.log"; } >> "$OUT/session.log"; tail -n 25 "$OUT/.step.log"; rm -f "$OUT/.step.log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
for s in $STEPS; do case $s in
  build) step build 240 python3 setup.py build_ext --inplace ;;
  tests) step tests 170 python3 -m pytest -q -x -p no:cacheprovider tests/ops ;;
  kernels) step kernels 90 python3 benchmarks/gpu_kernels.py --out "$OUT/gpu_kernels.md" ;;
  collect) step collect 120 python3 benchmarks/bench_collect.py --device cuda --backend both --out "$OUT/collect" ;;
  train) step train 300 python3 benchmarks/bench_train.py --device cuda --shape llama-3.1-8b --seq 4096 --dtype bf16 \
           --masks "$MASKS" --language mt --configs ours,ours-recompute-up,floor --steps 4 --warmup 2 --timeout 95 \
           --out "$OUT/train" ;;
  scale) step scale 300 python3 benchmarks/bench_scale.py --device cuda --layers 4 --tokens 131072 --repeats 2 \
           --warmup 0 --out "$OUT/scale" ;;
esac; done
ls -R "$OUT" | head -40
