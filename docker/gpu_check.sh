#!/usr/bin/env bash
# lut-fast GPU check: one call, under 8 minutes, on one H100 / H200.
#
#   bash docker/gpu_check.sh [--quick] [--budget-s 400]
#
# Runs from a plain copy of the repository: the package need not be installed
# (lut_fast/bench/gpu_check.py maps pipelines/ and datasets/ itself and stands
# in for PyYAML if it is missing). Needs python3 with torch, timm, numpy, rich
# (+ torchvision for JPEG decode). Measures: train step of vit_small / vit_base,
# MAE vs LUT (interleaved), eager vs torch.compile, bf16; every GPU-side data
# path: each backend's gpu-training configuration (CPU side alone, uint8 out),
# the device stage (finish_batch: view 2's photometric ops + normalisation on
# the GPU), decode_jpeg on CUDA, against the decode floor and the official LUT
# recipe. Without a CUDA device it stops at once (exit 2). Writes
# gpu_check.json (after every row) and gpu_check.txt to $OUT if set, else
# runs/gpu_check/.
#
# First it runs the test suite's gpu-marked tests (`pytest -m gpu`: three
# training steps of bf16 + torch.compile + channels-last, and of fp16 +
# GradScaler, through lut_fast.train.train), so this check and the suite
# agree; their output goes to gpu_tests.txt, their time comes out of the
# budget, and a failure makes the script exit 1 after the measurements.
# They need pytest and the installed package (pip install -e '.[test]');
# without them the script says so and goes on. GPU_CHECK_TESTS=0 skips them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
DEST="${OUT:-$ROOT/runs/gpu_check}"
BUDGET="${GPU_CHECK_BUDGET:-400}"     # seconds after which no new measurement starts
HARD_LIMIT="${GPU_CHECK_TIMEOUT:-470}" # the whole script, whatever happens

mkdir -p "$DEST"
cd "$ROOT"
export PYTHONDONTWRITEBYTECODE=1
"$PY" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, gpu: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}")'

tests_rc=0
if [[ "${GPU_CHECK_TESTS:-1}" != 0 ]]; then
  if "$PY" -c 'import pytest, lut_fast.pipelines, torch; assert torch.cuda.is_available()' 2>/dev/null; then
    started=$SECONDS
    timeout --kill-after=10 240 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu.py \
      >"$DEST/gpu_tests.txt" 2>&1 || tests_rc=$?
    tail -n 5 "$DEST/gpu_tests.txt"
    used=$((SECONDS - started))
    BUDGET=$((BUDGET > used + 60 ? BUDGET - used : 60))
    HARD_LIMIT=$((HARD_LIMIT > used + 90 ? HARD_LIMIT - used : 90))
    if [[ $tests_rc != 0 ]]; then echo "gpu tests FAILED (exit $tests_rc): see $DEST/gpu_tests.txt"; fi
  else
    echo "gpu tests not run: needs pytest, the installed package (pip install -e '.[test]') and a CUDA device"
  fi
fi
bench_rc=0
timeout --kill-after=10 "$HARD_LIMIT" "$PY" -m lut_fast.bench.gpu_check --out "$DEST" --budget-s "$BUDGET" "$@" || bench_rc=$?
if [[ $bench_rc != 0 ]]; then exit "$bench_rc"; fi
if [[ $tests_rc != 0 ]]; then exit 1; fi
