#!/usr/bin/env bash
# Regenerates every CPU figure in docs/benchmarks/ in one go: 5-7 minutes on a 2-core machine once the images are made.
#
#   bash docs/benchmarks/run_cpu.sh          # or: make bench-cpu
#
# Run it on a quiet machine: every JSON records the load average at its start and end, and the
# README in this folder should quote them. What it does:
#   1. makes the bench images once (photos:N, crops of real photographs; cached) and converts them for
#      FFCV (`convert ffcv` defaults) and, where the converters offer --shorter-side, also stored at
#      shorter side 224 for FFCV, DALI and (`convert folder`, where this checkout has it) torch;
#   2. bench data -> cpu-data.json (every backend, both configurations, official recipe, decode floors)
#      and cpu-data-stored224.json (torch / DALI / FFCV reading the pre-resized storage);
#   3. bench train -> cpu-train-vit_tiny.json (CPU defaults; methods interleaved step by step);
#   4. bench e2e -> cpu-e2e-torch.json (the real train loop fed by the torch backend).
# Settings: LUT_FAST (the command; default .venv/bin/lut-fast), PYTHON (default .venv/bin/python),
# DEST (default docs/benchmarks), IMAGES (default 1024), WORKERS (default 2), WORK (converted data;
# default ~/.cache/lut_fast/bench-cpu).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
LF="${LUT_FAST:-$ROOT/.venv/bin/lut-fast}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
DEST="${DEST:-$ROOT/docs/benchmarks}"
IMAGES="${IMAGES:-1024}"
WORKERS="${WORKERS:-2}"
WORK="${WORK:-${LUT_FAST_CACHE:-$HOME/.cache/lut_fast}/bench-cpu}"
mkdir -p "$DEST" "$WORK"
t0=$(date +%s)
say() { echo "[$(( $(date +%s) - t0 ))s, load $(cut -d' ' -f1-3 /proc/loadavg)] $*"; }

say "1/4 images and converted data (made once, under $WORK)"
SRC="$("$PY" -c "from lut_fast.bench.data import resolve_data; print(resolve_data('photos:$IMAGES')[0])")"
NAME="$(basename "$SRC")"  # names the photograph set too: converted data never outlives its source
BETON="$WORK/$NAME.beton"
[ -f "$BETON" ] || "$LF" convert ffcv "$SRC" "$BETON" --workers "$WORKERS"
STORED=0
if "$LF" convert ffcv --help | grep -q -- "--shorter-side"; then
  STORED=1
  BETON224="$WORK/$NAME-s224.beton"
  SHARDS224="$WORK/$NAME-s224-shards"
  [ -f "$BETON224" ] || "$LF" convert ffcv "$SRC" "$BETON224" --shorter-side 224 --workers "$WORKERS"
  [ -d "$SHARDS224" ] || "$LF" convert dali "$SRC" "$SHARDS224" --shorter-side 224 --workers "$WORKERS"
fi
STORED_BACKENDS="dali,ffcv"
STORED_TORCH=()
if "$LF" convert --help | grep -q "folder"; then
  FOLDER224="$WORK/$NAME-s224-folder"
  [ -d "$FOLDER224" ] || "$LF" convert folder "$SRC" "$FOLDER224" --shorter-side 224 --workers "$WORKERS"
  STORED_BACKENDS="torch,dali,ffcv"
  STORED_TORCH=(--torch-data "$FOLDER224")
fi

say "2/4 bench data: every backend, both configurations, the official recipe, decode floors"
"$LF" bench data --backend all --data "photos:$IMAGES" --ffcv-data "$BETON" --workers "$WORKERS" --windows 4 \
  --json "$DEST/cpu-data.json"
if [ "$STORED" = 1 ]; then
  "$LF" bench data --backend "$STORED_BACKENDS" --data "photos:$IMAGES" ${STORED_TORCH[@]+"${STORED_TORCH[@]}"} \
    --dali-data "$SHARDS224" --ffcv-data "$BETON224" \
    --workers "$WORKERS" --windows 4 --json "$DEST/cpu-data-stored224.json"
else
  say "   (skipped cpu-data-stored224.json: this checkout's converters have no --shorter-side)"
fi

say "3/4 bench train (CPU defaults, methods interleaved)"
"$LF" bench train --json "$DEST/cpu-train-vit_tiny.json"

say "4/4 bench e2e (torch backend)"
"$LF" bench e2e --model vit_tiny --img-size 112 --backend torch --data "photos:$IMAGES" --batch-size 16 \
  --workers "$WORKERS" --steps 10 --warmup 3 --json "$DEST/cpu-e2e-torch.json"

say "done: wrote the JSON files in $DEST"
