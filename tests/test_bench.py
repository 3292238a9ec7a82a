"""The throughput benchmark runs on CPU, so it never rots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lws_megatron.benchmark import BenchResult, render

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("compile", ["none", "model"])
def test_bench_measures_steps_and_every_layer_shape(compile):
    proc = subprocess.run(
        [
            sys.executable,
            "launch/bench.py",
            "tests/configs/tiny.yaml",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--micro-batch",
            "2",
            "--compile",
            compile,
            "--json",
            "train.log_interval=2",
            *(
                ["--profile", "model.sdpa_kernel=math", "model.fused_loss=true"]
                if compile == "model"
                else []
            ),
            *(["--read-every-step"] if compile == "none" else []),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json.loads(proc.stdout.strip().splitlines()[-1])  # libraries log above it
    assert result["config"] == "tiny" and result["device"] == "cpu"
    assert result["steps"] == 2 and result["micro_batch_size"] == 2
    assert result["compile"] == compile
    assert result["sdpa_kernel"] == ("math" if compile == "model" else "auto")
    # one compiled graph for the one chunk, kept through every step: no break, no recompile
    assert (result["compiled_graphs"], result["graph_breaks"]) == (
        (1, 0) if compile == "model" else (0, 0)
    )
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1
    assert result["step_time_min_s"] <= result["step_time_median_s"] <= result["step_time_max_s"]
    # over the timed steps back to back: at most what the fastest step alone would give
    assert result["tokens_per_s"] <= 2 * 32 / result["step_time_min_s"]
    # the numbers of a step are read once per log interval (2 steps), or after every step
    assert result["read_every_step"] == (compile == "none")
    assert result["syncs_per_step"] == (1.0 if compile == "none" else 0.5)
    assert result["syncs_in_steps"] == 0  # the read is the one wait; the steps have none
    assert 5 < result["first_loss"] < 7  # about ln 512 at initialisation
    assert result["fused_loss"] == (compile == "model") and result["data_parallel"] == 1
    if compile == "model":
        profile = result["profile"]
        assert profile["wall_ms_per_step"] > 0 and 0 < profile["busy_ms_per_step"]
        assert profile["top"] and any(o["name"] == "aten::mm" for o in profile["top"])
    else:
        assert result["profile"] is None
    # launch/gpu_session.sh renders the JSON rows back into the table
    table = render([BenchResult.from_dict(result)])
    row = table.splitlines()[1].split()
    assert row[:2] == ["tiny", "cpu"] and row[3:5] == [compile, result["sdpa_kernel"]]
    assert ("a profiled step" in table) == (compile == "model")
    covered = sorted(i for t in result["layer_timings"] for i in t["layers"])
    assert covered == [0, 1, 2, 3] and all(t["seconds"] > 0 for t in result["layer_timings"])


def test_bench_reports_a_missing_config_in_one_line():
    proc = subprocess.run(
        [sys.executable, "launch/bench.py", "missing.yaml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert (
        proc.returncode == 2 and proc.stderr.strip() == "error: missing.yaml: config file not found"
    )
