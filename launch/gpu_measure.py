"""The GPU measurement, sized for a lent GPU's minutes: `python launch/gpu_measure.py OUT [CACHE]`.

One process builds each model once and measures the rows of `lws_megatron/measure/rows.py`
on it, switching in place what can be switched (CUDA graphs, the fused loss, reading the
step's numbers every step), in order of value: everything on for baseline-18l and crown-18l
first, then one thing off at a time, then the builds of their own (fp32 weights under
autocast, Transformer Engine's spec), then data parallelism over every GPU (torchrun over
`launch/bench.py`, where there are two or more). Each row is checked (its first loss
against fp32, no host wait in a steady step, no graph break) and printed the moment it is
measured. The whole run ends within BUDGET_S seconds (default 300): a row that would not fit
is not started, a process past its time is stopped, and what was measured is kept.

OUT receives table.md, results.json, logs.tar.gz and compile_cache.N.xz (at most 8 files).
CACHE (a folder holding an earlier OUT's compile_cache.*.xz) is loaded first, so a second
run compiles little. Exits 1 when a row failed or was not run. SMOKE=1: the same rows on
tiny shapes (a CPU test of the script; data parallelism on two CPU processes); ROWS=0,3:
only those rows.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from lws_megatron.measure.results import PREFIX, check, load_records, row_line, write_results
from lws_megatron.measure.rows import GPU, ROWS, SMOKE, on_device, skip_reason

ROOT = Path(__file__).resolve().parents[1]

PACK_S = 15  # kept for writing the files at the end
GRACE_S = 30  # for the row in progress when the measuring process's own time is up
SIZES = SMOKE if os.environ.get("SMOKE") == "1" else GPU


def gpu_count() -> int:
    """GPUs on this machine as the driver lists them, before any process has started torch;
    the measuring process's own count (its device record) decides the data-parallel row."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in listed.stdout.splitlines())


def run_logged(command: list[str], log: Path, timeout: float, env: dict) -> int | None:
    """Run `command` in its own process group, its output into `log` and the lines marked
    for the console onto this console; its exit code, or None if it was stopped at `timeout`."""
    with log.open("a") as sink:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )  # fmt: skip

        def pump() -> None:
            for line in proc.stdout:
                sink.write(line)
                if line.startswith(PREFIX):
                    print(line[len(PREFIX) :], end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        reader.join(timeout=10)
    return code


def environment() -> dict:
    path = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def session_rows(
    chosen: list[int], scratch: Path, cache: Path | None, seconds: float
) -> list[dict]:
    """The rows one measuring process runs (its device record first, whatever the rows), as
    their records; rows it did not hand over are recorded as stopped at the time limit, lost
    with the process, or not run."""
    indices = [i for i in chosen if not ROWS[i].data_parallel]
    command = [sys.executable, __file__, "--session", str(scratch), str(seconds - GRACE_S),
               ",".join(map(str, indices)), str(cache or "")]  # fmt: skip
    # At least the time to start and hand over its device record.
    code = run_logged(command, scratch / "session.log", max(seconds, GRACE_S), environment())
    _, records = load_records(scratch / "rows.jsonl")
    done = {r["index"] for r in records}
    lost = (
        "stopped at the time limit before it finished"
        if code is None
        else f"the measuring process ended (exit code {code}) before it finished; see session.log"
    )
    for i in indices:
        if i not in done:
            status = ("failed", lost) if lost else ("not run", "out of time")
            records.append(_unfinished(i, *status))
            lost = None  # the row in progress is lost; the ones after it never started
    return records


def _unfinished(index: int, status: str, reason: str) -> dict:
    row = ROWS[index]
    key = "error" if status == "failed" else "reason"
    return {
        "index": index,
        "row": row.name,
        "config": row.build.config,
        "status": status,
        key: reason,
    }


def data_parallel_row(index: int, scratch: Path, seconds: float, header: dict | None) -> dict:
    """The row over every GPU (two CPU processes without one): torchrun over launch/bench.py,
    whose own figures (its JSON row) are the row's result. `header`: the measuring
    process's device record (None: it gave none)."""
    row = ROWS[index]
    record = {"index": index, "row": row.name, "config": row.build.config}
    if header is None:
        return {
            **record,
            "status": "not run",
            "reason": "the measuring process gave no device record",
        }
    gpus = header["gpus"]
    cuda = header["device"] != "cpu"
    reason = skip_reason(row, cuda, gpus, None)
    if reason or seconds < SIZES.min_row_s:
        status = (
            ("skipped", reason) if reason else ("not run", f"out of time ({seconds:.0f} s left)")
        )
        return {**record, "status": status[0], "reason": status[1]}
    build, switches, notes = on_device(row, cuda)
    processes = gpus if cuda else 2
    notes.append(f"{processes} processes, one per {'GPU' if cuda else 'CPU process (gloo)'}")
    cache = []  # the measuring process's kernels: crown's step compiles to the same graphs
    if (scratch / "compile_cache.bin").is_file():
        shutil.copyfile(scratch / "compile_cache.bin", scratch / "data_parallel_cache.bin")
        cache = ["--compile-cache", str(scratch / "data_parallel_cache.bin")]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={processes}", "launch/bench.py", build.path,
        "--micro-batch", str(SIZES.micro_batch), "--steps", str(SIZES.steps),
        "--warmup", str(SIZES.warmup), "--no-layer-times", "--json", *cache,
        *([] if switches.sync_free else ["--read-every-step"]),
        *build.overrides(), *switches.overrides(), *SIZES.overrides,
    ]  # fmt: skip
    started = time.monotonic()
    log = scratch / "data_parallel.log"
    code = run_logged(command, log, seconds, environment())
    record.update(notes=notes, seconds=time.monotonic() - started)
    result = _bench_json(log)
    if code != 0 or result is None:
        error = "stopped at the time limit" if code is None else f"exit code {code}"
        return {**record, "status": "failed", "error": f"{error}; see data_parallel.log"}
    checks, failures = check(result, None, switches.sync_free)
    status = "failed" if failures else "measured"
    return {
        **record,
        "status": status,
        "error": "; ".join(failures) or None,
        "checks": checks,
        "result": result,
    }


def _bench_json(log: Path) -> dict | None:
    """Rank 0's result: the last JSON row launch/bench.py printed."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("[{"):
            try:
                return json.loads(line)[0]
            except (ValueError, IndexError):
                return None
    return None


def measure(out: Path, cache: Path | None, chosen: list[int], budget: float) -> int:
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="gpu_measure."))
    gpus = gpu_count()
    parallel = [i for i in chosen if ROWS[i].data_parallel]
    reserve = PACK_S + (SIZES.data_parallel_s if parallel and gpus != 1 else 0)
    records = session_rows(chosen, scratch, cache, budget - reserve - (time.monotonic() - started))
    header, _ = load_records(scratch / "rows.jsonl")
    for index in parallel:
        left = budget - PACK_S - (time.monotonic() - started)
        records.append(data_parallel_row(index, scratch, left, header))
        print(row_line(records[-1]), flush=True)
    records.sort(key=lambda r: r["index"])
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(
            [*(["SMOKE=1"] if SIZES is SMOKE else []), f"BUDGET_S={budget:.0f}", "python",
             "launch/gpu_measure.py", str(out), *([str(cache)] if cache else [])]
        ),
        "budget_s": budget,
        "wall_s": time.monotonic() - started,
    }  # fmt: skip
    files = write_results(out, scratch, header, records, meta)
    shutil.rmtree(scratch, ignore_errors=True)
    print((out / "table.md").read_text())
    print("files: " + ", ".join(f"{f.name} ({f.stat().st_size:,} bytes)" for f in files))
    bad = [r for r in records if r["status"] in ("failed", "not run")]
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--session"]:
        from lws_megatron.measure.session import run_session

        scratch, seconds, indices, cache = argv[1:5]
        chosen = [int(i) for i in indices.split(",") if i]
        return run_session(
            Path(scratch), chosen, ROWS, SIZES, float(seconds), Path(cache) if cache else None
        )
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: launch/gpu_measure.py [-h] OUT [CACHE]\n\n{__doc__}")
        return 0
    if not argv or len(argv) > 2 or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    only = os.environ.get("ROWS")
    chosen = [int(i) for i in only.split(",")] if only else list(range(len(ROWS)))
    if any(not 0 <= i < len(ROWS) for i in chosen):
        print(f"error: ROWS={only}: rows are 0 to {len(ROWS) - 1}", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(argv[1]) if len(argv) > 1 else None
    return measure(out, cache, chosen, float(os.environ.get("BUDGET_S", 300)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
