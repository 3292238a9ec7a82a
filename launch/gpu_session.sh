#!/usr/bin/env bash
# One GPU session as one call of the device tool: install the carried wheels (.whl/, made here
# by launch/gpu_wheels.sh), then launch/gpu_measure.py within BUDGET_S seconds (default 300;
# give the call about 60 s more for the install). Results go to $OUT (or ./gpu_out). An earlier
# call's compiled kernels are loaded from $COMPILE_CACHE (default gpu_cache/, where its
# compile_cache.*.xz files go, carried with the call), so that call compiles little.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}; mkdir -p "$out"
cache=${COMPILE_CACHE:-gpu_cache}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 launch/gpu_measure.py "$out" $([ -d "$cache" ] && echo "$cache")
