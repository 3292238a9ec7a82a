#!/usr/bin/env bash
# One GPU session, as one call of the device tool: install the carried wheels (.whl/, made by
# launch/gpu_wheels.sh), check bf16-on-GPU against fp32-on-CPU, then benchmark the paper's
# profiles eager and with per-layer torch.compile. Results go to $OUT (or ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, megatron.core, deepspeed; print('torch', torch.__version__)"
timeout 100 python3 launch/gpu_check.py configs/paper/crown-18l.yaml 2>&1 | grep -v -i warn
paper=configs/paper
timeout 170 python3 launch/bench.py $paper/baseline-18l.yaml $paper/vanilla-18l.yaml \
  $paper/framed-18l.yaml $paper/reverse-18l.yaml $paper/crown-18l.yaml \
  --micro-batch 16 --steps 15 --warmup 3 --json 2>"$out/bench_eager.err" | tail -1 > "$out/bench_eager.json"
python3 -c "import json,sys; from lws_megatron.benchmark import BenchResult, LayerTiming, render
rows=[BenchResult(**{**r,'layer_timings':[LayerTiming(**t) for t in r['layer_timings']]}) for r in json.load(open(sys.argv[1]))]
print(render(rows))" "$out/bench_eager.json" || tail -20 "$out/bench_eager.err"
timeout 190 python3 launch/bench.py $paper/baseline-18l.yaml $paper/crown-18l.yaml --micro-batch 16 \
  --steps 15 --warmup 5 --compile layers --no-layer-times 2>"$out/bench_compiled.err" | tail -12 \
  || tail -20 "$out/bench_compiled.err"
