"""Jobs that survive the cluster, run for real: 2-process runs of the tiny config on gloo under
launch/torchrun.py with loader workers on, signalled, killed and stopped the ways a cluster
does it, each compared with the same run left alone (bit for bit on CPU); and a failed run that
the project's batch script requeues on a one-node SLURM cluster (tests/launch/slurm_cluster.py)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import TINY

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[2]

SBATCH = ROOT / "launch" / "slurm" / "pretrain.sbatch"
STEPS = 16
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def command(run_dir: Path, data, *options: str, overrides=()) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "launch" / "torchrun.py"),
        "--standalone",
        "--nproc_per_node=2",
        *options,
        str(ROOT / "launch" / "pretrain.py"),
        "--config",
        str(TINY),
        f"run.dir={run_dir}",
        f"data.path=[{data['prefix']}]",
        f"data.tokenizer={data['tokenizer']}",
        f"train.max_steps={STEPS}",
        "data.num_workers=2",
        *overrides,
    ]


def start(argv: list[str]) -> subprocess.Popen:
    """In a process group of its own, as a shell starts a job."""
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        cwd=ROOT,
        start_new_session=True,
    )


def run(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)


def read_until(proc: subprocess.Popen, pattern: str, timeout: float = 240) -> list[str]:
    """Lines of the output up to the first matching `pattern`."""
    lines, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return lines
        if time.monotonic() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"never saw {pattern!r}:\n{''.join(lines)[-4000:]}")


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"still running after {timeout} s:\n{out[-4000:]}")
    return out


def losses(run_dir: Path, steps: int = STEPS) -> list[float]:
    """The loss of every step, each logged once."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    steps_logged = [r["step"] for r in map(json.loads, lines) if "loss" in r]
    assert steps_logged == list(range(1, steps + 1)), steps_logged
    by_step = {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}
    return [by_step[s] for s in sorted(by_step)]


def workers_of(launcher_pid: int) -> dict[int, int]:
    """{global rank: pid} of the training processes a launcher started."""
    from launch.torchrun import children

    ranks = {}
    for pid in children(launcher_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile
            continue
        # a child between fork and exec still has the launcher's environment, without RANK
        rank = next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[rank] = pid
    return ranks


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL to every process of the job (torchrun starts each worker in a session of its own,
    so its process group holds the launcher only), as a node that dies."""
    from launch.torchrun import children

    ranks = list(workers_of(proc.pid).values())
    for pid in [proc.pid, *ranks, *(c for rank in ranks for c in children(rank))]:
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)


def latest(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])


@pytest.fixture(scope="module")
def uninterrupted_dir(tmp_path_factory, tiny_data) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = run(command(run_dir, tiny_data))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_dir) -> list[float]:
    return losses(uninterrupted_dir)


def test_run_info_says_what_made_the_run_and_metrics_name_ranks(uninterrupted_dir):
    import torch

    info = json.loads((uninterrupted_dir / "run_info.json").read_text())
    assert (
        info["git"]["commit"]
        == subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    )
    assert info["versions"]["torch"] == torch.__version__
    assert {"python", "megatron-core", "deepspeed", "transformers"} <= info["versions"].keys()
    launch = info["launch"]
    assert launch["launcher"] == "torchrun" and launch["torchrun_restart"] == "0"
    assert (launch["world_size"], launch["nodes"]) == (2, 1)
    assert list(launch["processes_per_node"].values()) == [2]
    steps = [json.loads(line) for line in (uninterrupted_dir / "metrics.jsonl").open()]
    steps = [r for r in steps if "loss" in r]
    assert all(r["mem_rank"] in (0, 1) and r["slowest_rank"] in (0, 1) for r in steps)
    assert all(r["slowest_rank_forward_s"] >= r["median_rank_forward_s"] > 0 for r in steps)


@pytest.mark.serial  # where a stop lands in a step is chance: load beside it blurs that
@pytest.mark.parametrize("zero", [0, 1])
def test_a_slow_rank_is_named_with_how_much_slower_it_is(tmp_path, tiny_data, zero):
    """Rank 1 is stopped most of the time (SIGSTOP/SIGCONT): a straggler. The step time is the
    same on both ranks; their time in forward passes is not (at ZeRO 1 the other rank's
    forward also waits for the weight gather, which the clock leaves out)."""
    run_dir = tmp_path / "run"
    argv = command(
        run_dir,
        tiny_data,
        overrides=[
            f"zero.stage={zero}",
            "train.max_steps=25",
            "train.log_interval=5",
            "eval.interval=0",
            "train.callbacks=[step_time_watchdog]",
        ],
    )
    proc = start(argv)
    deadline = time.monotonic() + 60  # found before the steps, which run 20 a second
    while 1 not in workers_of(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    slow = workers_of(proc.pid)[1]
    seen = read_until(proc, r"^step +5/\d+ \|")
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None and '"step": 25,' not in (  # then it saves at its own pace
        metrics.read_text() if metrics.exists() else ""
    ):
        try:
            os.kill(slow, signal.SIGSTOP)
            time.sleep(0.2)
            os.kill(slow, signal.SIGCONT)
        except ProcessLookupError:
            break
        time.sleep(0.01)
    out = "".join(seen) + finish(proc)
    assert proc.returncode == 0, out[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    late = [r for r in records if "loss" in r and 15 <= r["step"] < 25]  # wholly stopped
    assert [r["step"] for r in late] == [15, 20], records
    assert all(r["slowest_rank"] == 1 for r in late), late
    assert all(r["slowest_rank_forward_s"] > 1.3 * r["median_rank_forward_s"] for r in late), late
    warned = re.findall(r"warning: .*rank 1 is the slowest, forward [0-9.]+ s per step, .*", out)
    assert warned, out[-4000:]
    print(warned[-1])
    print("metrics.jsonl, step 20:", {k: v for k, v in late[-1].items() if "rank" in k})


def test_sigterm_to_the_whole_process_group_checkpoints_exits_0_and_resumes_exactly(
    tmp_path, tiny_data, uninterrupted
):
    """`kill -TERM -- -PGID` of the launcher (torchrun starts each rank in a session of its
    own), and SIGTERM to every loader worker too, as SLURM signals every process of a step."""
    from launch.torchrun import children

    run_dir = tmp_path / "run"
    proc = start(command(run_dir, tiny_data))
    seen = read_until(proc, r"^step +2/\d+ \|")
    loaders = [pid for rank in workers_of(proc.pid).values() for pid in children(rank)]
    assert len(loaders) == 4  # data.num_workers=2 per rank
    os.killpg(proc.pid, signal.SIGTERM)
    for pid in loaders:
        os.kill(pid, signal.SIGTERM)
    out = "".join(seen) + finish(proc)
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out and "DataLoader worker" not in out
    stopped = latest(run_dir)
    by = re.search(
        r"pre-emption signal \(SIGTERM to rank \d by step (\d+)\): checkpointed at step (\d+)", out
    )
    assert int(by[1]) >= 2 and int(by[2]) == stopped == int(by[1]) + 1, out[-4000:]
    print(f"exit 0; signalled by step {by[1]}, checkpointed at step {stopped}")
    resumed = run(command(run_dir, tiny_data))
    assert resumed.returncode == 0 and f"at step {stopped}" in resumed.stdout
    assert losses(run_dir) == uninterrupted  # bit for bit
    print(f"resumed at step {stopped}: losses of steps 1-{STEPS} equal to the uninterrupted run's")


def test_a_run_killed_before_its_first_checkpoint_starts_again_with_the_same_command(
    tmp_path, tiny_data, uninterrupted
):
    run_dir = tmp_path / "run"
    proc = start(command(run_dir, tiny_data))
    read_until(proc, r"^step +3/\d+ \|")
    kill_job(proc)
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
    again = run(command(run_dir, tiny_data))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "ended before its first checkpoint: it starts again from step 0" in again.stdout
    assert losses(run_dir) == uninterrupted
    print(f"started again with the same command: exit 0, {STEPS} steps, the uninterrupted losses")


def test_a_killed_loader_worker_ends_the_run_with_a_checkpoint_and_one_line(
    tmp_path, tiny_data, uninterrupted
):
    run_dir = tmp_path / "run"
    proc = start(command(run_dir, tiny_data))
    seen = read_until(proc, r"^step +2/\d+ \|")
    from launch.torchrun import children

    victim = children(workers_of(proc.pid)[1])[0]
    os.kill(victim, signal.SIGKILL)
    out = "".join(seen) + finish(proc)
    assert proc.returncode == 1, out[-4000:]
    assert "Traceback" not in out
    stopped = latest(run_dir)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.fullmatch(
        rf"error: rank 1: data loader worker \d \(pid {victim}\) died: killed by SIGKILL \(the "
        rf"kernel's out-of-memory killer\?\); checkpointed at step {stopped}, exiting: start the "
        "run again to resume from there",
        errors[0],
    ), errors
    print(f"exit 1; {errors[0]}")
    resumed = run(command(run_dir, tiny_data))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert losses(run_dir) == uninterrupted


def test_torchrun_restarts_the_group_after_a_rank_is_killed_and_resumes_exactly(
    tmp_path, tiny_data, uninterrupted
):
    run_dir = tmp_path / "run"
    argv = command(run_dir, tiny_data, "--max-restarts=1", overrides=["checkpoint.interval=4"])
    proc = start(argv)
    seen = read_until(proc, r"^step +6/\d+ \|")
    os.kill(workers_of(proc.pid)[1], signal.SIGKILL)
    out = "".join(seen) + finish(proc)
    assert proc.returncode == 0, out[-4000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000004'} at step 4" in out
    assert losses(run_dir) == uninterrupted
    print(f"exit 0 after one restart, resumed at step 4; losses of 1-{STEPS} as uninterrupted")


def test_a_stopped_rank_ends_the_job_in_one_line_naming_it(tmp_path, tiny_data):
    """SIGSTOP: the process is there, its sockets open, and it never answers again."""
    run_dir = tmp_path / "run"
    argv = command(
        run_dir,
        tiny_data,
        overrides=["train.max_steps=100000", "run.collective_timeout_s=20", "eval.interval=0"],
    )
    proc = start(argv)
    seen = read_until(proc, r"^step +3/\d+ \|")
    stopped = workers_of(proc.pid)[1]
    began = time.monotonic()
    os.kill(stopped, signal.SIGSTOP)
    try:
        out = "".join(seen) + finish(proc, timeout=120)
    finally:
        if Path(f"/proc/{stopped}").exists():
            os.kill(stopped, signal.SIGKILL)
    took = time.monotonic() - began
    assert proc.returncode != 0 and took < 90, (took, out[-4000:])
    named = [line for line in out.splitlines() if "rank 1 did not arrive" in line]
    assert len(named) == 1, out[-4000:]
    # at the collective the others waited in: the step's all-reduce, or (stopped mid-step) the
    # gradient buckets' wait
    assert named[0].startswith("error: rank 1 did not arrive at ")
    assert "within run.collective_timeout_s=20" in named[0]
    assert "Traceback" not in out
    print(f"exit {proc.returncode} {took:.1f} s after SIGSTOP; {named[0]}")


def training_process(run_dir: Path, rank: int) -> int:
    """The pid of the training process of `rank` in the run writing to `run_dir`."""
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"run.dir={run_dir}".encode() in argv and f"RANK={rank}".encode() in environ:
            if any(arg.endswith(b"pretrain.py") for arg in argv):
                return int(entry.name)
    raise AssertionError(f"no training process of rank {rank} writes to {run_dir}")


def test_slurm_requeues_a_failed_run_which_resumes(slurm_cluster, tmp_path, tiny_data):
    """No restart inside the job (LWS_MAX_RESTARTS=0): rank 1 SIGKILLed after a checkpoint fails
    the run, the batch script requeues the job, and the requeued run resumes."""
    cluster, run_dir, steps = slurm_cluster, tmp_path / "failed", 200
    log = tmp_path / "failed.log"
    env = "LWS_NPROC_PER_NODE=2,LWS_MAX_RESTARTS=0,LWS_MAX_REQUEUES=1,OMP_NUM_THREADS=1"
    proc = cluster.run(
        "sbatch",
        "--parsable",
        f"--cpus-per-task={cluster.cpus}",
        "--time=10",
        f"--output={log}",
        f"--export=ALL,{env},LWS_PYTHON={sys.executable}",
        str(SBATCH),
        str(TINY),
        f"data.path=[{tiny_data['prefix']}]",
        f"data.tokenizer={tiny_data['tokenizer']}",
        f"run.dir={run_dir}",
        f"train.max_steps={steps}",
        "checkpoint.interval=5",
        "eval.interval=0",
    )
    job_id = cluster.track(proc.stdout.strip().split(";")[0])
    deadline = time.monotonic() + 180
    while not (run_dir / "checkpoints" / "latest").exists():
        state = cluster.job(job_id).get("JobState")
        if time.monotonic() > deadline or state not in ("PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"job {job_id} {state}, no checkpoint:\n{cluster.logs()}")
        time.sleep(0.2)
    os.kill(training_process(run_dir, 1), signal.SIGKILL)
    fields = cluster.wait_job(
        job_id,
        timeout=300,
        until=lambda f: f.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
    )
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", text
    assert "lws: the run failed with status 1" in text
    assert f"requeueing job {job_id} (requeue 1 of 1) to resume from the latest checkpoint" in text
    assert "error: rank 1 did not arrive at" in text  # rank 0's line, before the requeue
    assert f"lws: job {job_id} (restart 1)" in text and "resumed from" in text
    assert len(losses(run_dir, steps)) == steps  # every step once
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == steps
