#!/usr/bin/env bash
# One GPU session, as one call of the device tool (at most 8 minutes): install the carried
# wheels (.whl/, made by launch/gpu_wheels.sh), then launch/gpu_measure.py: correctness (bf16 on
# the GPU against fp32 on the CPU, steps without a host wait), the matmul ceiling and the
# throughput rows, one process each. Results go to $OUT (or ./gpu_out); compiled kernels are
# read from and saved to $COMPILE_CACHE (default $OUT/compile_cache): carry a previous call's
# cache back in (e.g. COMPILE_CACHE=gpu_cache) and the second call compiles little.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
python3 launch/gpu_measure.py "$out" "${COMPILE_CACHE:-$out/compile_cache}"
