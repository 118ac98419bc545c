#!/usr/bin/env bash
# The wheels a bare GPU machine lacks for the speed benchmarks, downloaded here into .whl/ for its
# Python 3.12 (x86-64). Its image carries torch, numpy, safetensors, huggingface-hub, PyYAML,
# Pillow, requests, regex and filelock, but not diffusers, pydantic or pydantic-settings. The
# versions are the ones this checkout's venv runs, so both machines run the same code.
# Carry .whl with the GPU run; bench/gpu_speed.sh installs it when the imports fail there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
names=(diffusers importlib_metadata pydantic pydantic_core pydantic-settings annotated-types
       typing-inspection typing_extensions python-dotenv)
pins=()
for name in "${names[@]}"; do
  pins+=("$name==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
du -sh .whl
