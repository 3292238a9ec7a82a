"""A run directory nothing can corrupt, end to end: launches of launch/pretrain.py that a
careless or hostile user would try, and the run-directory lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_training import ROOT, TINY, command, records, train

from lws_megatron.config import load_config
from lws_megatron.errors import UserError
from lws_megatron.training.run_dir import RunLock, clear_records, refuse_foreign_records

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]


def test_a_fresh_start_over_an_earlier_runs_checkpoints_is_refused(tmp_path, tiny_data):
    run_dir, _ = train(tmp_path, "r", 1, tiny_data, "train.max_steps=2", "checkpoint.interval=1")
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    _, proc = train(
        tmp_path, "r", 1, tiny_data, "train.max_steps=4", "checkpoint.resume=false", check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "holds checkpoints of an earlier run and checkpoint.resume=false" in proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_a_damaged_latest_checkpoint_falls_back_and_metrics_continue(tmp_path, tiny_data):
    run_dir, _ = train(
        tmp_path,
        "d",
        1,
        tiny_data,
        "train.max_steps=4",
        "checkpoint.interval=2",
        "checkpoint.keep=3",
    )
    model = run_dir / "checkpoints" / "step_00000004" / "__0_0.distcp"
    model.write_bytes(model.read_bytes()[:1000])
    _, proc = train(
        tmp_path,
        "d",
        1,
        tiny_data,
        "train.max_steps=6",
        "checkpoint.interval=2",
        "checkpoint.keep=3",
    )
    assert "step_00000004 is damaged (__0_0.distcp has 1000 bytes" in proc.stdout
    assert "at step 2" in proc.stdout
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 logged once, by the resume
    assert (run_dir / "checkpoints" / "step_00000004.damaged").is_dir()


def test_deleting_every_checkpoint_does_not_restart_the_run_silently(tmp_path, tiny_data):
    run_dir, _ = train(tmp_path, "g", 1, tiny_data, "train.max_steps=2")
    for path in sorted((run_dir / "checkpoints").glob("step_*"), reverse=True):
        subprocess.run(["rm", "-r", str(path)], check=True)
    _, proc = train(tmp_path, "g", 1, tiny_data, "train.max_steps=4", check=False)
    assert proc.returncode == 2 and "holds the metrics of an earlier run" in proc.stderr
    assert _steps(run_dir) == [1, 2]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            "train.global_batch_size=16",
            "was saved with train.global_batch_size=8 and this run has 16: the data position "
            "is counted in global batches; resume with train.global_batch_size=8",
        ),
        # another seed would change the data order from the resumed step on
        (
            "train.seed=7",
            "was trained with train.seed=1234 and this run sets train.seed=7, which would change "
            "the data order from here on; resume with train.seed=1234, or start a new run.dir",
        ),
    ],
)
def test_a_refused_resume_leaves_the_run_records_alone(tmp_path, tiny_data, change, message):
    run_dir, _ = train(tmp_path, "z", 1, tiny_data, "train.max_steps=2")
    config, info = (run_dir / "config.yaml").read_text(), (run_dir / "run_info.json").read_text()
    _, proc = train(tmp_path, "z", 1, tiny_data, "train.max_steps=4", change, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    ours = [line for line in proc.stderr.splitlines() if "] [DeepSpeed] " not in line]
    assert len(ours) == 1 and "Traceback" not in proc.stderr  # DeepSpeed's CPU warning aside
    assert (run_dir / "config.yaml").read_text() == config
    assert (run_dir / "run_info.json").read_text() == info


def test_resuming_past_max_steps_says_so(tmp_path, tiny_data):
    run_dir, _ = train(tmp_path, "m", 1, tiny_data, "train.max_steps=4")
    _, proc = train(tmp_path, "m", 1, tiny_data, "train.max_steps=2", check=False)
    assert proc.returncode == 2
    assert "resumed at step 4, past train.max_steps=2" in proc.stderr
    _, proc = train(tmp_path, "m", 1, tiny_data, "train.max_steps=4")
    assert "the run is already complete" in proc.stdout
    assert records(run_dir) and _steps(run_dir) == [1, 2, 3, 4]


def test_a_run_killed_during_start_up_does_not_hold_up_the_next(tmp_path, tiny_data):
    """Each start used to JIT-build a DeepSpeed CPU op under a file lock in
    $TORCH_EXTENSIONS_DIR (machine-wide by default): a start killed while building left the
    lock, and every later start on the machine waited on it, printing nothing."""
    extensions = tmp_path / "torch_extensions"  # empty: nothing built yet
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(extensions)}
    run_dir = tmp_path / "k"
    launch = command(1, run_dir, tiny_data, "train.max_steps=2")
    first = subprocess.Popen(
        launch,
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:  # killed at the first trace of its start-up: a build's lock, or the run's own
        deadline = time.monotonic() + 300
        while not (list(extensions.glob("*/lock")) or (run_dir / ".lock").exists()):
            assert first.poll() is None and time.monotonic() < deadline, "no start-up seen"
            time.sleep(0.01)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the run and whatever it started
        first.wait()
    second = subprocess.run(
        launch, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )  # on a fresh lock-free start it trains in ~10 s
    assert second.returncode == 0, second.stderr[-3000:]
    assert "this run takes it over" in second.stdout and _steps(run_dir) == [1, 2]
    assert not extensions.exists() or list(extensions.iterdir()) == []  # nothing was built


# ---- the lock (no training needed) ----


def _hold(path: str) -> None:
    RunLock(Path(path)).acquire()
    print("held", flush=True)
    sys.stdin.readline()


def test_a_second_run_in_a_directory_in_use_is_refused(tmp_path):
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"import test_run_safety as t; t._hold({str(tmp_path)!r})"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            UserError,
            match=rf"{tmp_path} is in use by another run \(pid "
            rf"{holder.pid} on ",
        ):
            RunLock(tmp_path).acquire()
    finally:
        holder.communicate("\n", timeout=30)
    lock = RunLock(tmp_path)  # the kernel dropped the lock when its holder exited
    assert f"pid {holder.pid}" in lock.acquire()
    lock.release()
    assert RunLock(tmp_path).acquire() is None  # a released lock leaves no note


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(tmp_path):
    (tmp_path / ".lock").write_text(
        json.dumps(
            {"pid": 999999, "host": os.uname().nodename, "started": "2026-01-01T00:00:00+00:00"}
        )
    )
    lock = RunLock(tmp_path)
    note = lock.acquire()
    assert note and "pid 999999" in note and "ended without releasing it" in note
    lock.release()


def test_a_lock_held_from_another_host_names_the_way_to_clear_it(tmp_path):
    (tmp_path / ".lock").write_text(
        json.dumps({"pid": 42, "host": "node-elsewhere", "started": "2026-01-01T00:00:00+00:00"})
    )
    with pytest.raises(UserError, match=rf"host node-elsewhere .*delete {tmp_path}/.lock"):
        RunLock(tmp_path).acquire()


def _fork_then_die(path: str) -> None:
    """Take the lock, fork a child that outlives us (as a loader worker would), die."""
    RunLock(Path(path)).acquire()
    child = os.fork()
    if child == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # let the parent's output end
        os.dup2(devnull, 2)
        time.sleep(30)
        os._exit(0)
    print(child, flush=True)
    os._exit(0)


def test_a_forked_child_does_not_keep_a_dead_runs_lock(tmp_path):
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"import test_run_safety as t; t._fork_then_die({str(tmp_path)!r})"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    child = int(proc.stdout.strip())
    try:
        lock = RunLock(tmp_path)
        assert "ended without releasing it" in lock.acquire()
        lock.release()
    finally:
        os.kill(child, signal.SIGKILL)


# ---- records of a run that died before its first checkpoint (no training needed) ----


def _died_early(run_dir: Path, config: dict) -> None:
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 6.2}\n')
    (run_dir / "tensorboard").mkdir()


def test_records_of_the_same_run_without_a_checkpoint_are_replaced(tmp_path):
    config = load_config(TINY, []).to_dict()
    _died_early(tmp_path / "r", config)
    relaunched = {**config, "train": {**config["train"], "max_steps": 50}}  # how, not what
    assert refuse_foreign_records(tmp_path / "r", True, False, relaunched)
    clear_records(tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["config.yaml"]


def test_records_of_another_run_without_a_checkpoint_are_refused_naming_the_key(tmp_path):
    config = load_config(TINY, []).to_dict()
    _died_early(tmp_path / "r", config)
    other = {**config, "optim": {**config["optim"], "lr": 0.01}}
    with pytest.raises(UserError, match=r"another run that saved no checkpoint \(optim.lr: 0.001"):
        refuse_foreign_records(tmp_path / "r", True, False, other)


def test_records_of_a_run_whose_checkpoints_were_deleted_are_refused(tmp_path):
    config = load_config(TINY, []).to_dict()
    _died_early(tmp_path / "r", config)
    (tmp_path / "r" / "checkpoints").mkdir()
    (tmp_path / "r" / "checkpoints" / "latest").write_text("step_00000004\n")
    with pytest.raises(UserError, match="holds the metrics of an earlier run"):
        refuse_foreign_records(tmp_path / "r", True, False, config)
