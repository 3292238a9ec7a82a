"""Launchers for real clusters, run for real: mpirun, two torchrun launchers on loopback, and a
one-node SLURM cluster (tests/launch/slurm_cluster.py) running the project's sbatch and
launch/submit.py,
pre-emption and requeue included.

The 2-process torchrun run of the tiny config is the reference: an MPI launch, two single-process
"nodes" and srun --mpi=pmix must reproduce its losses, which shows their processes formed one
job with the same ranks.
"""

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from slurm_cluster import free_port

from lws_megatron.config import load_config
from tests.helpers import TINY

ROOT = Path(__file__).resolve().parents[2]

CROWN = ROOT / "configs" / "demo" / "crown.yaml"
SBATCH = ROOT / "launch" / "slurm" / "pretrain.sbatch"
SUBMIT = ROOT / "launch" / "submit.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS = 3


def data_args(data) -> list[str]:
    return [f"data.path=[{data['prefix']}]", f"data.tokenizer={data['tokenizer']}"]


def pretrain(config: Path, run_dir: Path, data, *overrides: str) -> list[str]:
    return [
        str(ROOT / "launch" / "pretrain.py"),
        "--config",
        str(config),
        f"run.dir={run_dir}",
        *data_args(data),
        *overrides,
    ]


def records(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """{step: value} from metrics.jsonl; a line still being written is left out."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def losses(run_dir: Path) -> np.ndarray:
    by_step = records(run_dir)
    assert sorted(by_step) == list(range(1, len(by_step) + 1)), sorted(by_step)
    return np.array([by_step[s] for s in sorted(by_step)])


@contextmanager
def started(*commands: list[str], env=ENV):
    """Start each command in its own process group; kill what's left of them on the way out."""
    procs = []
    try:
        for argv in commands:
            procs.append(
                subprocess.Popen(
                    argv,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=env,
                    cwd=ROOT,
                    start_new_session=True,
                )
            )
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the group we started: launcher + workers
            proc.wait(timeout=30)
            if proc.stdout:
                proc.stdout.close()


def finish(proc: subprocess.Popen, name: str, timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} still running after {timeout} s")
    if proc.returncode != 0:
        pytest.fail(f"{name} failed ({proc.returncode}):\n{out[-6000:]}")
    return out


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory, tiny_data) -> Path:
    """The reference: torchrun --standalone --nproc_per_node 2, DP=2, a few steps."""
    run_dir = tmp_path_factory.mktemp("two_proc") / "run"
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *pretrain(TINY, run_dir, tiny_data, f"train.max_steps={STEPS}"),
    ]
    with started(argv) as (proc,):
        finish(proc, "torchrun --nproc_per_node 2")
    assert len(losses(run_dir)) == STEPS
    return run_dir


def load_submit():
    spec = importlib.util.spec_from_file_location("lws_submit", SUBMIT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


# ---- multi-node rendezvous on one machine, and MPI ----


def test_two_torchrun_launchers_on_loopback_train_as_one_job(tmp_path, tiny_data, two_proc):
    run_dir, port = tmp_path / "loopback", free_port()
    node = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
    ]
    args = pretrain(TINY, run_dir, tiny_data, f"train.max_steps={STEPS}")
    with started([*node, "--node_rank=0", *args], [*node, "--node_rank=1", *args]) as (n0, n1):
        out0, out1 = finish(n0, "node rank 0"), finish(n1, "node rank 1")
    info = json.loads((run_dir / "run_info.json").read_text())
    assert (info["world_size"], info["dp"]) == (2, 2)
    assert "step      3/" in out0 and "step      1/" not in out1  # one job: global rank 0 logs
    np.testing.assert_allclose(losses(run_dir), losses(two_proc), rtol=0, atol=1e-6)


def mpirun_env() -> dict[str, str]:
    # mpirun refuses root unless told twice; vader's CMA copies need ptrace, which containers
    # often forbid (a harmless default elsewhere).
    return {
        **ENV,
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
    }


@pytest.mark.skipif(
    shutil.which("mpirun") is None,
    reason="mpirun is not installed (bash .ci/system_packages.sh installs OpenMPI)",
)
@pytest.mark.distributed
@pytest.mark.slow
def test_mpirun_trains_with_ranks_from_mpi(tmp_path, tiny_data, two_proc):
    run_dir = tmp_path / "mpi"
    argv = [
        "mpirun",
        "--oversubscribe",
        "-np",
        "2",
        sys.executable,
        *pretrain(TINY, run_dir, tiny_data, f"train.max_steps={STEPS}"),
    ]
    with started(argv, env=mpirun_env()) as (proc,):
        out = finish(proc, "mpirun -np 2")
    assert (
        out.count(f"step      3/{STEPS} | loss") == 1
    )  # two ranks of one job, not two lone processes
    info = json.loads((run_dir / "run_info.json").read_text())
    assert (info["world_size"], info["dp"]) == (2, 2)
    np.testing.assert_allclose(losses(run_dir), losses(two_proc), rtol=0, atol=1e-6)


# ---- the batch script and submit.py without a cluster ----


def dry_run_line(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {"PATH": os.environ["PATH"], "LWS_DRY_RUN": "1", **env}
    return subprocess.run(["bash", str(SBATCH), *args], capture_output=True, text=True, env=full)


def test_sbatch_passes_config_and_overrides_as_words_never_as_shell(tmp_path):
    hostile = ["run.name=a b; touch PWNED", "run.dir=$(touch PWNED)/x's", "data.path=[`id`]"]
    proc = dry_run_line(
        "configs/my config.yaml", *hostile, LWS_NPROC_PER_NODE="2", SLURM_NNODES="3"
    )
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[argv.index("--config") + 1 :] == ["configs/my config.yaml", *hostile]
    assert "--nnodes=3" in argv and "--nproc_per_node=2" in argv and "--rdzv_backend=c10d" in argv
    assert argv[:2] == ["srun", "--mpi=none"] and "--ntasks-per-node=1" in argv
    assert not list(Path.cwd().glob("PWNED")) and not (ROOT / "PWNED").exists()


@pytest.mark.parametrize(
    "gpus, expected",
    [
        ({"SLURM_GPUS_ON_NODE": "4"}, "4"),
        ({"SLURM_GPUS_PER_NODE": "a100:8"}, "8"),
        ({"SLURM_GPUS_PER_NODE": "gpu:h100:2"}, "2"),
    ],
)
def test_sbatch_starts_one_process_per_gpu_of_the_allocation(gpus, expected):
    proc = dry_run_line("c.yaml", **gpus)
    assert proc.returncode == 0, proc.stderr
    assert f"--nproc_per_node={expected}" in shlex.split(proc.stdout)
    mpi = dry_run_line("c.yaml", LWS_LAUNCHER="mpi", **gpus)
    assert f"--ntasks-per-node={expected}" in shlex.split(mpi.stdout)
    assert "--mpi=pmix" in shlex.split(mpi.stdout) and "torch.distributed.run" not in mpi.stdout


def test_sbatch_without_gpus_or_process_count_says_what_to_set():
    proc = dry_run_line("c.yaml")
    assert proc.returncode == 2 and "LWS_NPROC_PER_NODE" in proc.stderr


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """An `sbatch` on PATH that records its arguments and answers with job id 4242."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "sbatch_calls"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        f'#!/bin/bash\nprintf "%s\\n" "$@" >> {shlex.quote(str(calls))}\necho 4242\n'
    )
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


REFUSALS = {
    "tp-does-not-divide-world": (
        ["--gpus-per-node", "3", "parallel.tp=2"],
        "--nodes 1 x 3 GPUs per node = 3 processes can't hold parallel.tp=2 x parallel.pp=1",
    ),
    "pp-does-not-divide-world": (
        ["--nodes", "3", "--gpus-per-node", "1", "parallel.pp=2"],
        "= 3 processes can't hold parallel.tp=1 x parallel.pp=2: launch a multiple of 2",
    ),
    "layout-does-not-fit": (
        ["--gpus-per-node", "2", "parallel.pp=2", "parallel.pipeline_layout=Et*1|t*2L"],
        "parallel.pipeline_layout='Et*1|t*2L' doesn't fit parallel.pp=2 and model.num_layers=4",
    ),
    "planner-layout-does-not-fit": (
        ["--gpus-per-node", "5", "parallel.pp=5", "parallel.pipeline_layout=auto"],
        "PP=5 is more than the model's 4 layers",
    ),
    "uneven-split-without-layout": (
        ["--gpus-per-node", "3", "parallel.pp=3"],
        "model.num_layers=4 doesn't split evenly over parallel.pp=3",
    ),
    "batch-does-not-split": (
        ["--gpus-per-node", "3"],
        "train.global_batch_size=8 is not a multiple of train.micro_batch_size=2 x "
        "data-parallel size 3",
    ),
    "heads-do-not-split": (["--gpus-per-node", "4", "parallel.tp=4"], "not divisible by TP=4"),
    "unsafe-job-name": (
        ["--gpus-per-node", "1", "--job-name", "x;reboot"],
        "--job-name 'x;reboot': use letters, digits",
    ),
    "negative-restarts": (
        ["--gpus-per-node", "1", "--max-restarts", "-1"],
        "--max-restarts -1: must be at least 0",
    ),
    "time-before-warning": (
        ["--gpus-per-node", "1", "--time", "2"],
        "--time 2 (120 s) leaves no room before the pre-emption warning",
    ),
    "missing-data": (
        ["--gpus-per-node", "1", "data.tokenizer=/nonexistent/tok.model"],
        "/nonexistent/tok.model",
    ),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_submit_refuses_what_the_allocation_cant_run_before_queueing(
    case, tmp_path, tiny_data, fake_sbatch, capsys
):
    args, message = REFUSALS[case]
    run_dir = tmp_path / "run"
    argv = [str(TINY), *data_args(tiny_data), f"run.dir={run_dir}", *args]
    assert load_submit().main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not fake_sbatch.exists() and not run_dir.exists()


def test_submit_writes_the_resolved_job_and_submits_it(tmp_path, tiny_data, fake_sbatch, capsys):
    run_dir = tmp_path / "runs dir" / "$(touch PWNED) it's"
    argv = [
        str(TINY),
        *"--nodes 2 --gpus-per-node 2 --partition gpu,gpu-long --time 1-00:00".split(),
        *"--account proj1 --qos high --exclusive".split(),
        "parallel.pp=2",
        "parallel.pipeline_layout=auto",
        "train.max_steps=7",
        *data_args(tiny_data),
        f"run.dir={run_dir}",
    ]
    submit_py = load_submit()
    assert submit_py.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    job = run_dir / "job"
    logs = submit_py.sbatch_value("--output", str(job / "logs") + "/%x-%j.out")
    assert "submitted job 4242" in out and str(job / "logs" / "lws-tiny-4242.out") in out
    from lws_megatron.planner import plan_layout

    planned = plan_layout(load_config(TINY, ["parallel.pp=2", "parallel.pipeline_layout=auto"]))
    assert f"TP 1 x PP 2 x DP 2, pipeline layout {planned}," in out
    assert fake_sbatch.read_text().splitlines() == ["--parsable", str(job / "submit.sbatch")]
    resolved = load_config(job / "config.yaml")
    assert (resolved.train.max_steps, resolved.parallel.pp, resolved.run.dir) == (
        7,
        2,
        str(run_dir),
    )
    script = (job / "submit.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(job / "submit.sbatch")]).returncode == 0
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --partition=gpu,gpu-long",
        "#SBATCH --time=1-00:00",
        "#SBATCH --account=proj1",
        "#SBATCH --qos=high",
        "#SBATCH --exclusive",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --chdir={submit_py.sbatch_value('--chdir', os.getcwd())}",
        f"#SBATCH --output={logs}",
        f"set -- {shlex.quote(str(job / 'config.yaml'))}",
        "export LWS_MAX_RESTARTS=3",
        "export LWS_MAX_REQUEUES=3",
    ):
        assert line in script.splitlines(), line
    assert "train.max_steps" not in script and planned not in script  # no hyper-parameters
    assert not (ROOT / "PWNED").exists() and not Path("PWNED").exists()


def test_submit_dry_run_prints_the_script_and_launch_line_and_writes_nothing(
    tmp_path, tiny_data, fake_sbatch, capsys
):
    run_dir = tmp_path / "dry"
    argv = [
        str(TINY),
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--dry-run",
        "parallel.tp=2",
        *data_args(tiny_data),
        f"run.dir={run_dir}",
    ]
    assert load_submit().main(argv) == 0
    out = capsys.readouterr().out
    assert "2 node(s) x 4 GPUs = 8 processes: TP 2 x PP 1 x DP 4" in out
    assert "#SBATCH --gpus-per-node=4" in out and "#!/bin/bash" in out
    launch = next(line for line in out.splitlines() if line.startswith("srun "))
    argv = shlex.split(launch)
    assert argv[argv.index("--config") :] == ["--config", str(run_dir / "job" / "config.yaml")]
    assert {"--nodes=2", "--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d"} <= set(argv)
    assert argv[argv.index("--nnodes=2") - 1] == str(ROOT / "launch" / "torchrun.py")
    assert "--max_restarts=3" in argv
    assert f"sbatch {run_dir / 'job' / 'submit.sbatch'}" in out
    assert not fake_sbatch.exists() and not run_dir.exists()


# ---- a real one-node SLURM cluster ----


def submit(cluster, *args: str) -> tuple[str, str]:
    proc = subprocess.run(
        [sys.executable, str(SUBMIT), *args],
        capture_output=True,
        text=True,
        env={**cluster.env, "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = proc.stdout.split("submitted job ")[1].split(";")[0]
    return cluster.track(job_id), proc.stdout


def job_log(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run_dir / "job" / "logs").glob("*.out")))


def test_slurm_runs_a_demo_config_submitted_with_submit_py(slurm_cluster, tmp_path, tiny_data):
    cluster = slurm_cluster
    run_dir = tmp_path / "slurm runs" / "crown's run#1 $HOME"  # quoted all the way, or it breaks
    refused = subprocess.run(
        [
            sys.executable,
            str(SUBMIT),
            str(CROWN),
            "--procs-per-node",
            "3",
            *data_args(tiny_data),
            "model.vocab_size=512",
            f"run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        env=cluster.env,
        cwd=ROOT,
    )
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "train.global_batch_size=16 is not a multiple" in refused.stderr
    assert cluster.run("squeue", "-h").stdout.strip() == ""  # nothing queued
    job_id, out = submit(
        cluster,
        str(CROWN),
        "--nodes",
        "1",
        "--procs-per-node",
        "2",
        "--cpus-per-task",
        str(cluster.cpus),
        "--time",
        "10",
        *data_args(tiny_data),
        "model.vocab_size=512",
        f"run.dir={run_dir}",
        f"train.max_steps={STEPS}",
        "train.log_interval=1",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "eval.interval=0",
    )
    fields = cluster.wait_job(job_id, timeout=240)
    log = job_log(run_dir)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log + cluster.logs()
    assert sorted(records(run_dir)) == list(range(1, STEPS + 1))
    assert all(np.isfinite(losses(run_dir)))
    info = json.loads((run_dir / "run_info.json").read_text())
    assert (info["world_size"], info["dp"], info["total_params"]) == (
        2,
        2,
        load_config(CROWN, ["model.vocab_size=512"]).summary().total_params,
    )
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    assert f"lws: job {job_id} (restart 0) on 1 node(s) x 2 process(es), head localhost:" in log
    assert "--rdzv_backend=c10d" in log and f"--rdzv_id={job_id}" in log
    assert "lws: the run ended with status 0" in log


def test_slurm_preemption_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path, tiny_data):
    """The project's sbatch file as it is, warned the way SLURM warns: USR1 to the batch shell."""
    cluster, run_dir, steps = slurm_cluster, tmp_path / "preempt", 120
    log = tmp_path / "preempt.log"
    proc = cluster.run(
        "sbatch",
        "--parsable",
        f"--cpus-per-task={cluster.cpus}",
        "--time=10",
        f"--output={log}",
        f"--export=ALL,LWS_NPROC_PER_NODE=2,OMP_NUM_THREADS=1,LWS_PYTHON={sys.executable}",
        str(SBATCH),
        str(TINY),
        *data_args(tiny_data),
        f"run.dir={run_dir}",
        f"train.max_steps={steps}",
        "eval.interval=0",
    )
    job_id = cluster.track(proc.stdout.strip().split(";")[0])
    deadline = time.monotonic() + 180
    while len(records(run_dir)) < 3:
        state = cluster.job(job_id).get("JobState")
        if time.monotonic() > deadline or state not in ("PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(
                f"job {job_id} {state}, no steps logged:\n"
                f"{log.read_text() if log.exists() else ''}\n{cluster.logs()}"
            )
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    fields = cluster.wait_job(
        job_id,
        timeout=240,
        until=lambda f: f.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
    )
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", text
    stopped = int(
        re.search(
            r"pre-emption signal \(SIGUSR1 to rank \d by step \d+\): checkpointed at step (\d+)",
            text,
        )[1]
    )
    assert 3 <= stopped < steps
    assert f"requeueing job {job_id} to resume from the latest checkpoint" in text
    assert f"lws: job {job_id} (restart 1)" in text
    assert (
        f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:08d}'} at step {stopped}" in text
    )
    assert sorted(records(run_dir)) == list(range(1, steps + 1))  # every step once, none lost
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == steps


def test_slurm_mpi_launcher_gets_ranks_from_pmix(slurm_cluster, tmp_path, tiny_data, two_proc):
    cluster, run_dir = slurm_cluster, tmp_path / "srun-mpi"
    job_id, _ = submit(
        cluster,
        str(TINY),
        "--procs-per-node",
        "2",
        "--launcher",
        "mpi",
        "--time",
        "10",
        *data_args(tiny_data),
        f"run.dir={run_dir}",
        f"train.max_steps={STEPS}",
    )
    fields = cluster.wait_job(job_id, timeout=240)
    log = job_log(run_dir)
    assert fields["JobState"] == "COMPLETED", log + cluster.logs()
    assert "srun --mpi=pmix --nodes=1 --ntasks-per-node=2" in log
    assert log.count(f"step      3/{STEPS} | loss") == 1
    np.testing.assert_allclose(losses(run_dir), losses(two_proc), rtol=0, atol=1e-6)
