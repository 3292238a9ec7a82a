"""launch/sweep.py: one config over several seeds, each in its own run directory, one report row
with the mean and standard deviation; a failing run is named and the others are kept."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_report import table

from tests.helpers import TINY

ROOT = Path(__file__).resolve().parents[2]


def sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "launch/sweep.py", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_seeds_train_apart_and_the_report_gives_their_mean_and_std(tmp_path, tiny_data):
    out = tmp_path / "sweep"
    # Seed 3's directory holds an earlier run's records and no checkpoint: the trainer refuses it.
    blocked = out / "runs" / "tiny" / "seed3"
    blocked.mkdir(parents=True)
    (blocked / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    proc = sweep(
        str(TINY),
        "--seeds",
        "1",
        "2",
        "3",
        "--nproc",
        "1",
        "--output",
        str(out),
        "train.max_steps=2",
        "eval.interval=1",
        f"data.path=[{tiny_data['prefix']}]",
        f"data.tokenizer={tiny_data['tokenizer']}",
    )
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: 1 of 3 runs failed: {TINY} seed 3 ({blocked}")
    assert "covers the other 2" in error and not (blocked / "summary.json").exists()

    summaries = {}
    for seed in (1, 2):
        run_dir = out / "runs" / "tiny" / f"seed{seed}"
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["train"]["seed"] == seed and config["run"]["name"] == "tiny"
        assert json.loads((run_dir / "run_info.json").read_text())["name"] == "tiny"
        summaries[seed] = json.loads((run_dir / "summary.json").read_text())
        assert summaries[seed]["steps"] == 2
    assert summaries[1]["final_loss"] != summaries[2]["final_loss"]

    row = table((out / "report" / "report.md").read_text())["tiny"]
    assert row["seeds"] == "2"
    for column, key in (("final train loss", "final_loss"), ("final val loss", "final_val_loss")):
        values = [s[key] for s in summaries.values()]
        assert row[column] == f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


@pytest.mark.parametrize(
    "args, message",
    [
        ([str(TINY)], "--seeds: give the seeds to train with"),
        ([str(TINY), "--seeds"], "--seeds: give the seeds to train with"),
        ([str(TINY), "--seeds", "1", "2", "1"], "--seeds: seed 1 is given twice"),
        ([str(TINY), "--seeds", "1", "one"], "--seeds: 'one' is not an integer seed"),
        (
            ["configs/demo/nope.yaml", "--seeds", "1"],
            "configs/demo/nope.yaml: config file not found",
        ),
        ([str(TINY), "--seeds", "1", "train.seed=5"], "the sweep sets train.seed and run.dir"),
        ([str(TINY), "{tmp}/tiny.yaml", "--seeds", "1"], f"configs {TINY} and {{tmp}}/tiny.yaml"),
        ([str(TINY), str(TINY), "--seeds", "1"], "give each config once"),
    ],
)
def test_bad_input_is_one_line_before_anything_trains(tmp_path, args, message):
    (tmp_path / "tiny.yaml").write_text(f"base: {TINY}\n")
    proc = sweep(*[arg.format(tmp=tmp_path) for arg in args], "--output", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and message.format(tmp=tmp_path) in proc.stderr
    assert not (tmp_path / "out").exists()
