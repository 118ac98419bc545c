#!/usr/bin/env bash
# Training throughput on one CUDA GPU, DDPM CIFAR-10 layout (Ho et al. 2020): channels
# 128,256,256,256, 2 res blocks a level, attention at 16x16, 32x32x3, batch 128, bf16 autocast.
# Our U-Net against diffusers' UNet2DModel, eager and then with torch.compile for ours.
# No arguments needed; extra arguments go to both runs (e.g. --repeats 7).
# Figures land in bench/out/ (or $OUT_DIR) as JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-bench/out}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" bench/train_throughput.py --layout cifar-ddpm --json "$OUT_DIR/gpu_cifar_eager.json" "$@"
if [[ "${SKIP_COMPILE:-0}" != 1 ]]; then
  "$PY" bench/train_throughput.py --layout cifar-ddpm --compile \
    --json "$OUT_DIR/gpu_cifar_compile.json" "$@"
fi
