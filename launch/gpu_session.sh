#!/usr/bin/env bash
# One GPU session, as one call of the device tool: install the carried wheels (.whl/, made by
# launch/gpu_wheels.sh), check bf16-on-GPU against fp32-on-CPU, then benchmark the paper's
# profiles eager and with per-layer torch.compile. Results go to $OUT (or ./gpu_out).
#   EAGER="baseline-18l crown-18l" COMPILED="crown-18l" bash launch/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}; mkdir -p "$out"
eager=${EAGER:-baseline-18l vanilla-18l framed-18l reverse-18l crown-18l}
compiled=${COMPILED:-baseline-18l crown-18l}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
timeout 120 python3 launch/gpu_check.py configs/paper/crown-18l.yaml 2>&1 | grep -v -i warn | tail -5
bench() {  # bench NAME "CONFIGS" [bench.py options]
  local name=$1 configs=$2; shift 2
  timeout 200 python3 launch/bench.py $(printf 'configs/paper/%s.yaml ' $configs) \
    --micro-batch 16 --steps 15 --warmup 5 --json "$@" 2>"$out/$name.err" | tail -1 > "$out/$name.json"
  python3 - "$out/$name.json" <<'PY' || tail -5 "$out/$name.err"
import json, sys
from lws_megatron.benchmark import BenchResult, LayerTiming, render
rows = json.load(open(sys.argv[1]))
print(render([BenchResult(**{**r, "layer_timings": [LayerTiming(**t) for t in r["layer_timings"]]})
              for r in rows]))
PY
}
bench eager "$eager"
bench compiled "$compiled" --compile layers --no-layer-times
