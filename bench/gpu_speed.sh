#!/usr/bin/env bash
# Every GPU speed figure of bench/README.md from one run on one CUDA GPU, in under 8 minutes with
# compilation included:
#   training, cifar-ddpm layout, batch 128, bf16: ours compiled (channels-last, fused AdamW)
#     against diffusers' UNet2DModel compiled, same step code; FLOP utilisation of the measured
#     bf16 matmul ceiling;
#   sampling, cifar-ddpm layout with ten classes, DDIM 20 and DPM-Solver++(2M) 20, guidance 1.5,
#     bf16, batch 1024 (2048 a network call): ours channels-last and compiled with CUDA graphs
#     against diffusers' schedulers driving UNet2DModel eager and compiled alike.
# JSON and logs land in $OUT (or bench/out). The GPU image lacks diffusers and pydantic: run
# `bash bench/gpu_wheels.sh` here first and carry .whl; this script installs it when needed.
# DRY_RUN=1 runs the same commands on the CPU at the quickstart layout with tiny batches and
# step counts, compilation included (a check of the script, not a measurement).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [[ -d .whl ]] && ! "$PY" -c "import diffusers, pydantic_settings" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/diffpipe-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/diffpipe-site${PYTHONPATH:+:$PYTHONPATH}
fi
limits=(210 260)  # seconds: training, sampling (compilation included); 470 in all
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  limits=(1500 1500)  # two shared CPU cores compile slowly
  train=(--layout quickstart --device cpu --batch 4 --steps 1 --repeats 1 --warmup 0)
  sample=(--layout quickstart --device cpu --batch 2 --steps 2 --repeats 1)
else
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  train=(--layout cifar-ddpm --device cuda --batch 128 --precision bf16 --steps 20 --repeats 5)
  sample=(--layout cifar-ddpm --device cuda --dtype bf16 --batch "${SAMPLE_BATCH:-1024}"
          --repeats 3)
fi
status=0
timeout "${TRAIN_LIMIT_S:-${limits[0]}}" "$PY" bench/train_throughput.py "${train[@]}" \
  --compile --compile-diffusers --channels-last --fused-adamw \
  --json "$OUT/train_compiled.json" 2>&1 | tee "$OUT/train.log" || status=1
timeout "${SAMPLE_LIMIT_S:-${limits[1]}}" "$PY" bench/sample_throughput.py "${sample[@]}" \
  --compile --compile-mode reduce-overhead --compile-peer --channels-last --call-repeats 20 \
  --json-out "$OUT/sample_compiled.json" 2>&1 | tee "$OUT/sample.log" || status=1
exit "$status"
