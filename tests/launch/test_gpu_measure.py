"""The GPU measurement script runs end to end on CPU (SMOKE=1: tiny shapes), so a lent GPU's
few minutes are never lost to a broken script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_rows_write_their_json_the_table_and_a_reusable_compile_cache(tmp_path):
    env = {**os.environ, "SMOKE": "1", "ROWS": "3", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "launch/gpu_measure.py", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "row3.json").read_text())
    assert row["row"] == "+ fused loss, bf16 weights" and "error" not in row, row.get("error")
    result = row["result"]
    assert result["tokens_per_s"] > 0 and result["precision"] == "bf16"
    assert result["syncs_per_step"] == 0.1  # the paper configs log every 10 steps
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0].startswith("| device | config | row | tokens/s") and len(table) == 3
    assert "| + fused loss, bf16 weights |" in table[2]
    assert json.loads((tmp_path / "gemm.json").read_text())[0]["tflops"] > 0
    assert (tmp_path / "compile_cache" / "row3.bin").stat().st_size > 0
