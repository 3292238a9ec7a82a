"""The GPU measurement, one row per process: `python launch/gpu_measure.py OUT [CACHE]`.

Correctness first (`launch/gpu_check.py`: bf16 on the GPU against fp32 on the CPU, and steps
that never make the host wait), then the matmul ceiling, then the paper's baseline with one
change added per row, the leave-one-out of the fused loss, and crown with everything. Each row
is its own `launch/bench.py` process with its own timeout, so a hung row loses only itself;
rows start only while the time budget lasts. Compiled kernels are loaded from and saved to
CACHE (default OUT/compile_cache), so a second call compiles little. Writes every row's JSON
and OUT/table.md. SMOKE=1 runs the same on tiny shapes (a CPU test of the script); ROWS=0,3
runs only those rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = float(os.environ.get("BUDGET_S", 420))
SMOKE = os.environ.get("SMOKE") == "1"
ONLY = os.environ.get("ROWS")  # e.g. "0,3": the rows to run (default all)
BF16_AUTOCAST = ["train.precision=bf16-autocast"]
ALL = ["train.cuda_graphs=true", "model.fused_loss=true", "train.precision=bf16"]
ROWS = [  # name, config, overrides, bench options
    ("current step", "baseline-18l", BF16_AUTOCAST, ["--read-every-step"]),
    ("sync-free", "baseline-18l", BF16_AUTOCAST, []),
    ("+ CUDA graphs", "baseline-18l", [*BF16_AUTOCAST, "train.cuda_graphs=true"], []),
    ("+ fused loss, bf16 weights", "baseline-18l", ALL, []),
    ("all but the fused loss", "baseline-18l", [*ALL[:1], ALL[2]], []),
    ("all", "crown-18l", ALL, []),
    ("all but CUDA graphs", "baseline-18l", ALL[1:], []),
]
TINY = [
    "model.d_model=128",
    "model.d_head=16",
    "model.num_layers=4",
    "model.vocab_size=512",
    "model.seq_length=64",
    "train.cuda_graphs=false",  # CPU: the rest of each row runs as it would on the GPU
]


def run(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
        )
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, 124, "", f"timed out after {timeout:.0f} s")


def last_error(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "warn" not in ln.lower()]
    return lines[-1] if lines else f"exit code {proc.returncode}"


def bench_row(out: Path, cache: Path, index: int, row: tuple, timeout: float) -> dict:
    name, config, overrides, options = row
    if SMOKE:  # bf16 autocast is CUDA's; bf16 weights run on a CPU too
        overrides = [o.replace("bf16-autocast", "fp32") for o in overrides]
    sizes = (
        ["--micro-batch", "2", "--steps", "3", "--warmup", "1"]
        if SMOKE
        else ["--micro-batch", "16", "--steps", "15", "--warmup", "5"]
    )
    command = [
        sys.executable, "launch/bench.py", f"configs/paper/{config}.yaml", *sizes,
        "--compile", "model", "--no-layer-times", "--json",
        "--compile-cache", str(cache / f"row{index}.bin"),
        *options, *overrides, *(TINY if SMOKE else []),
    ]  # fmt: skip
    proc = run(command, timeout)
    (out / f"row{index}.log").write_text(proc.stderr[-20000:])
    record = {"row": name, "config": config, "overrides": overrides, "options": options}
    try:
        (result,) = json.loads(proc.stdout.strip().splitlines()[-1])
        record["result"] = result
    except (IndexError, ValueError):
        record["error"] = last_error(proc)
    (out / f"row{index}.json").write_text(json.dumps(record, indent=1))
    return record


def table(records: list[dict]) -> str:
    lines = [
        "| device | config | row | tokens/s | MFU | step ms median (min-max) | syncs/step |",
        "|---|---|---|---:|---:|---|---:|",
    ]
    for r in records:
        if "result" not in r:
            lines.append(f"| - | {r['config']} | {r['row']} | failed: {r['error']} | | | |")
            continue
        x = r["result"]
        syncs = "-" if x.get("syncs_per_step") is None else f"{x['syncs_per_step']:.2f}"
        lines.append(
            f"| {x['device']} | {x['config']} | {r['row']} | {x['tokens_per_s']:,.0f} | "
            f"{100 * x['mfu']:.1f}% | {1000 * x['step_time_median_s']:.1f} "
            f"({1000 * x['step_time_min_s']:.1f}-{1000 * x['step_time_max_s']:.1f}) | {syncs} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="launch/gpu_measure.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", type=Path, metavar="OUT", help="where the rows and table go")
    parser.add_argument("cache", type=Path, nargs="?", metavar="CACHE", help="compile cache")
    args = parser.parse_args(argv)
    started = time.monotonic()
    out = args.out
    cache = args.cache or out / "compile_cache"
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    if not SMOKE:
        check = run([sys.executable, "launch/gpu_check.py", "configs/paper/crown-18l.yaml"], 150)
        (out / "gpu_check.txt").write_text(check.stdout + check.stderr[-5000:])
        print(check.stdout[-3000:], flush=True)
    shapes = ["configs/paper/baseline-18l.yaml", "--micro-batch", "2" if SMOKE else "16"]
    gemm = run([sys.executable, "launch/bench.py", *shapes, "--gemm", *(TINY if SMOKE else [])], 60)
    (out / "gemm.json").write_text(gemm.stdout.strip().splitlines()[-1] if gemm.stdout else "[]")
    print(f"matmul ceiling: {gemm.stdout.strip()[-400:] or last_error(gemm)}", flush=True)
    records = []
    chosen = [int(i) for i in ONLY.split(",")] if ONLY else range(len(ROWS))
    for index, row in ((i, ROWS[i]) for i in chosen):
        left = BUDGET_S - (time.monotonic() - started)
        if left < 30:
            records.append({"row": row[0], "config": row[1], "error": "not run: out of time"})
            continue
        records.append(bench_row(out, cache, index, row, min(left, 150)))
        print(table(records[-1:]).splitlines()[-1], flush=True)
    (out / "table.md").write_text(table(records))
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
