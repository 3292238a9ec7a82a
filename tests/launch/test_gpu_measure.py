"""The GPU measurement runs end to end on CPU (SMOKE=1: tiny shapes), so a lent GPU's few
minutes are never lost to a broken script: every row, in one measuring process, within the
budget it is given, into the files a device machine hands back."""

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from lws_megatron.measure import compile_cache
from lws_megatron.measure.rows import ROWS

ROOT = Path(__file__).resolve().parents[2]


def _measure(out: Path, tmp_path: Path, timeout: float, **env: str):
    env = {
        **os.environ,
        "SMOKE": "1",
        "OMP_NUM_THREADS": "1",
        # compiled cold, as on a fresh machine, and nothing left in the shared cache
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext")),
        **env,
    }
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "launch/gpu_measure.py", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )
    return proc, time.monotonic() - started


@pytest.mark.slow
def test_smoke_measures_every_row_in_one_process_within_its_budget(tmp_path):
    """Beside the suite's other tests, so with twice the 300 s a GPU run has (alone on this
    2-core machine it takes 190 s): its own clock, not the test's, decides what runs."""
    out = tmp_path / "out"
    proc, seconds = _measure(out, tmp_path, timeout=900, BUDGET_S="600")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert seconds < 600, f"the smoke run took {seconds:.0f} s"
    print(f"SMOKE=1 BUDGET_S=600: every row measured in {seconds:.0f} s")
    rows = {r["index"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert sorted(rows) == list(range(len(ROWS)))
    for index, row in rows.items():
        assert f"[{index}] {row['config']}, {row['row']}:" in proc.stdout  # printed as measured
        if ROWS[index].build.attention_backend == "te":
            assert row["status"] == "skipped" and "CUDA" in row["reason"]
            continue
        assert row["status"] == "measured", row
        checks = row["checks"]
        assert checks["syncs_in_steps"] == 0 and checks["graph_breaks"] == 0
        if not ROWS[index].data_parallel:
            assert checks["relative_difference"] <= 1e-2  # against fp32 at the same weights
        assert row["result"]["tokens_per_s"] > 0
    _check_switched_in_place(rows)
    _check_files(out)


def _check_switched_in_place(rows: dict) -> None:
    """Baseline's rows share one build: switched rows build nothing, and compile only where a
    switch changes the graph (the fused loss; CPUs have no CUDA graphs to switch)."""
    first, crown, reads, graphs, unfused, autocast, before, _, parallel = (
        rows[i] for i in range(9)
    )
    assert (first["config"], crown["config"]) == ("baseline-18l", "crown-18l")
    assert first["build_seconds"] > 0 and autocast["build_seconds"] > 0
    assert reads["build_seconds"] == graphs["build_seconds"] == unfused["build_seconds"] == 0
    compiled = {i: rows[i]["result"]["compiled_graphs"] for i in range(7)}
    assert compiled == {0: 1, 1: 1, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1}
    assert not unfused["result"]["fused_loss"] and first["result"]["fused_loss"]
    assert reads["result"]["syncs_per_step"] == 1.0 and first["result"]["syncs_per_step"] == 0.1
    assert first["result"]["profile"]["top"] and crown["result"]["profile"]["top"]
    assert autocast["result"]["precision"] == before["result"]["precision"] == "fp32"
    assert "fp32: bf16 autocast needs a CUDA device" in autocast["notes"]
    assert parallel["result"]["data_parallel"] == 2 and parallel["result"]["config"] == "crown-18l"
    dp = parallel["result"]
    waits = dp["grad_wait_ms"] + dp["optimizer_ms"] + dp["gather_wait_ms"]
    assert 0 < waits < 1000 * dp["step_time_median_s"]


def _check_files(out: Path) -> None:
    """What a device machine hands back: at most 8 files of at most 16 MiB, no subfolder."""
    files = sorted(p.name for p in out.iterdir())
    assert files == ["compile_cache.0.xz", "logs.tar.gz", "results.json", "table.md"]
    assert all((out / f).is_file() and (out / f).stat().st_size < 16 * 2**20 for f in files)
    table = (out / "table.md").read_text()
    assert table.count("| passed |") == len(ROWS) - 1
    assert "skipped: Transformer Engine needs a CUDA device" in table
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers()}
    assert sorted(logs) == ["data_parallel.log", "session.log"]
    assert sum(line.startswith("[{") for line in logs["data_parallel.log"].splitlines()) == 1
    assert compile_cache.unpack(out)  # what a second run loads


@pytest.mark.slow
def test_rows_that_do_not_fit_the_budget_are_reported_and_fail_the_run(tmp_path):
    out = tmp_path / "out"
    proc, _ = _measure(out, tmp_path, timeout=300, BUDGET_S="16", ROWS="0,8")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["index"] for r in rows] == [0, 8]
    assert all(r["status"] in ("not run", "failed") for r in rows), rows
    assert "| 0 | baseline-18l | all on |" in (out / "table.md").read_text()


def test_the_compile_cache_packs_into_parts_and_back(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_cache, "PART_BYTES", 1000)
    data = os.urandom(2500)  # incompressible: three parts
    paths = compile_cache.pack(data, tmp_path, max_parts=3)
    assert [p.name for p in paths] == [f"compile_cache.{i}.xz" for i in range(3)]
    assert all(p.stat().st_size <= 1000 for p in paths)
    assert compile_cache.unpack(tmp_path) == data
    assert compile_cache.pack(data, tmp_path, max_parts=2) == []  # too large to carry
    assert compile_cache.unpack(tmp_path) is None  # and the old parts are gone
