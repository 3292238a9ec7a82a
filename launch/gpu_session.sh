#!/usr/bin/env bash
# One GPU session, as one call of the device tool: install the carried wheels (.whl/, made by
# launch/gpu_wheels.sh), check bf16-on-GPU against fp32-on-CPU (eager and compiled), then
# benchmark the paper's profiles, most important first: compiled whole (train.compile=model),
# the same on cuDNN attention (model.sdpa_kernel=cudnn), eager on the same card for comparison,
# then the other profiles compiled. Results go to $OUT (or ./gpu_out).
#   MODEL="crown-18l" CUDNN="" EAGER="" REST="" bash launch/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}; mkdir -p "$out"
model=${MODEL-baseline-18l crown-18l}
cudnn=${CUDNN-baseline-18l crown-18l}
eager=${EAGER-baseline-18l crown-18l}
rest=${REST-vanilla-18l framed-18l reverse-18l}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
timeout 240 python3 launch/gpu_check.py configs/paper/crown-18l.yaml 2>&1 | grep -v -i warn | tail -14
bench() {  # bench NAME "CONFIGS" [bench.py options]: one process per config, so that a
  local name=$1 configs=$2 c; shift 2  # timeout loses one row, not the table
  for c in $configs; do
    timeout 240 python3 launch/bench.py "configs/paper/$c.yaml" --micro-batch 16 --steps 15 \
      --warmup 5 --json "$@" 2>"$out/$name-$c.err" | tail -1 > "$out/$name-$c.json"
    python3 -c 'import json, sys; from lws_megatron.benchmark import BenchResult, render
print(render([BenchResult.from_dict(r) for r in json.load(open(sys.argv[1]))]))' \
      "$out/$name-$c.json" 2>/dev/null \
      || { echo "$name $c failed:"; grep -v -i warn "$out/$name-$c.err" | tail -5; }
  done
}
bench model "$model" --compile model --no-layer-times --profile
bench cudnn "$cudnn" --compile model --no-layer-times model.sdpa_kernel=cudnn
bench eager "$eager" --compile none
bench rest "$rest" --compile model --no-layer-times
