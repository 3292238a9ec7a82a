"""The communication a data-parallel step exposes, on a link you cap: each row trains the crown
demo twice, over a slow link and over a fast one, and compares the median step times.

    python launch/dp_overlap.py --slow "slow-link --rate 2gbit --" \
        --fast "slow-link --rate 100gbit --"

`--slow`/`--fast` prefix each torchrun (`slow-link` runs a command in a network namespace whose
loopback is capped; any wrapper that limits the link will do). Rows: ZeRO 0, 1 and 2 at DP=2,
and PP=2 x DP=2 (ZeRO 1, planned layout), one micro batch of 4 x 256 per rank, 14 steps, the
median `step_time_s` of steps 5-14 in each run's metrics.jsonl. A ratio near 1 means the
reduction hides behind backward. Prints a markdown table; the runs stay in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo" / "crown.yaml"
COMMON = [
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "data.num_workers=0",
    "train.max_steps=14",
    "train.log_interval=1",
    "eval.interval=0",
    "checkpoint.interval=0",
]
ROWS = {
    "ZeRO 0, DP=2": (2, ["zero.stage=0"]),
    "ZeRO 1, DP=2": (2, ["zero.stage=1"]),
    "ZeRO 2, DP=2": (2, ["zero.stage=2"]),
    "ZeRO 1, PP=2 x DP=2 (auto layout)": (
        4,
        ["zero.stage=1", "parallel.pp=2", "parallel.pipeline_layout=auto"],
    ),
}


def median_step_ms(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r and 5 <= r["step"] <= 14]
    return 1000 * statistics.median(times)


def train(link: list[str], nproc: int, overrides: list[str], run_dir: Path, data: Path) -> float:
    command = [
        *link,
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        "--master_port=29571",
        str(ROOT / "launch" / "pretrain.py"),
        "--config",
        str(CONFIG),
        *COMMON,
        *overrides,
        f"run.dir={run_dir}",
        f"data.path=[{data / 'demo'}]",
        f"data.tokenizer={data / 'tokenizer.model'}",
    ]
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(run_dir.with_suffix(".log"), "w") as log:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{run_dir.name} failed ({done.returncode}): see {log.name}")
    return median_step_ms(run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slow", required=True, help="command prefix of the capped link")
    parser.add_argument("--fast", required=True, help="command prefix of the uncapped link")
    parser.add_argument("--out", type=Path, default=ROOT / "demo_out" / "dp_overlap")
    parser.add_argument(
        "--data", type=Path, default=ROOT / "demo_out" / "data", help="the demo's data folder"
    )
    parser.add_argument("--rows", nargs="*", choices=list(ROWS), help="default: all")
    args = parser.parse_args(argv)
    if not (args.data / "demo.manifest.json").is_file():
        raise SystemExit(f"no demo data in {args.data}: run `make demo-quick` first, or --data")
    args.out.mkdir(parents=True, exist_ok=True)
    print("| run | fast link ms | slow link ms | slow / fast |\n|---|---:|---:|---:|")
    for name in args.rows or ROWS:
        nproc, overrides = ROWS[name]
        slug = "".join(c if c.isalnum() else "_" for c in name)
        fast = train(shlex.split(args.fast), nproc, overrides, args.out / f"{slug}_fast", args.data)
        slow = train(shlex.split(args.slow), nproc, overrides, args.out / f"{slug}_slow", args.data)
        print(f"| {name} | {fast:.0f} | {slow:.0f} | {slow / fast:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
