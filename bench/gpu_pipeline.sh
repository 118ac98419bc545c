#!/usr/bin/env bash
# The quickstart pipeline end to end on one CUDA GPU (about 3-5 minutes; under 8): each step's
# seconds and the device it recorded, then the sample step's throughput in fp32 and bf16.
# DEVICE=cpu DRY_RUN=1 checks the script on a CPU-only host in a minute or two (a short run).
# Extra arguments go to bench/gpu_pipeline.py (e.g. --set train.steps=2000).
# Figures land in bench/out/ (or $OUT_DIR) as JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT_DIR=${OUT_DIR:-bench/out}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
extra=()
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  extra=(--samples 64 --set train.steps=20 --set train.checkpoint_every=10
         --set pipeline.num_samples=100 --set sample.steps=5)
fi
timeout "${LIMIT_S:-480}" "$PY" bench/gpu_pipeline.py --device "$DEVICE" \
  --json "$OUT_DIR/gpu_pipeline_$DEVICE.json" "${extra[@]}" "$@"
