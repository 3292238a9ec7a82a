"""The README's demo command, end to end on its --quick path (shortened further)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ["baseline", "vanilla", "framed", "reverse", "crown"]


def test_quick_demo_builds_data_trains_five_profiles_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "launch/demo.py",
            "--quick",
            "--nproc",
            "1",  # data parallelism is the launch tests'; here, one process each
            "--output",
            str(out),
            "train.max_steps=4",
            "eval.interval=2",
            "eval.batches=2",
            "model.seq_length=64",
            "train.log_interval=2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report" / "report.md").read_text()
    for name in ("loss.png", "throughput.png", "profiles.png"):
        assert (out / "report" / name).read_bytes()[:4] == b"\x89PNG"
    rows = {
        line.split("|")[1].strip(): line
        for line in report.splitlines()
        if line.startswith("| ") and line.split("|")[1].strip() in PROFILES
    }
    assert sorted(rows) == sorted(PROFILES)
    final = {}
    for name in PROFILES:
        records = [
            json.loads(row)
            for row in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()
        ]
        val = [r["val_loss"] for r in records if "val_loss" in r]
        assert len(val) == 3 and val[-1] < val[0]  # steps 0, 2, 4; it learns, even in 4 steps
        assert f"{val[-1]:.4f}" in rows[name]  # the table is read from metrics.jsonl
        final[name] = val[-1]
    assert (out / "data" / "demo.manifest.json").is_file() and (out / "corpus").is_dir()
    # The best run is exported for Hugging Face and continues the demo's prompt.
    assert [p.name for p in (out / "export").iterdir()] == [min(final, key=final.get)]
    sample = proc.stdout[proc.stdout.rindex("\nThe Python") + 1 :].split("\nreport: ")[0]
    assert len(sample.strip()) > len("The Python") and "<0x" not in sample  # bytes as text
    # Progress: each run announced, with an ETA once a run has finished; steps of the total.
    lines = proc.stdout.splitlines()
    banners = [line for line in lines if line.startswith("[") and "/5] " in line]
    assert [b.split("]")[0] + "]" for b in banners] == [f"[{i}/5]" for i in range(1, 6)]
    assert [b.split()[1] for b in banners] == [f"{p}:" for p in PROFILES]
    assert "ETA" not in banners[0] and all(" | ETA " in b for b in banners[1:])
    assert sum(line.startswith("step      4/4 | loss") for line in lines) == 5
