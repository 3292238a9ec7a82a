"""A real one-node SLURM cluster on this machine, for the launcher tests.

`SlurmCluster` writes slurm.conf into a private directory, starts munged (its own key and
socket), slurmctld and slurmd in the foreground (-D) as child processes, waits until the node is
idle, and at the end cancels every job, waits for them to leave the queue, and stops the three
daemons by process id. Client commands (sbatch, squeue, scancel, ...) find the cluster through
`SLURM_CONF`, which `cluster.env` sets.

The `slurm_cluster` fixture (module scope) skips, with the reason, where SLURM or munge is not
installed (`.ci/system_packages.sh` installs Debian's slurm-wlm and munge, so CI runs it) or the
tests don't run as root (slurmd must start jobs as root here).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

NODE = "localhost"  # resolves everywhere, so torchrun's rendezvous on the head node does too


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


_SEARCH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def tool(name: str) -> str | None:
    """The full path of a SLURM or munge program (daemons live in sbin, often not on PATH)."""
    return shutil.which(name, path=_SEARCH)


def missing_reason() -> str | None:
    """Why this machine can't run the cluster, or None."""
    for name in ("munged", "slurmctld", "slurmd", "sbatch", "srun"):
        if tool(name) is None:
            return (
                f"{name} is not installed: the SLURM tests need Debian's slurm-wlm and munge "
                "(bash .ci/system_packages.sh installs them)"
            )
    if os.geteuid() != 0:
        return (
            "the one-node SLURM test cluster runs slurmd as root; run the tests as root (CI does)"
        )
    return None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the test process dies without cleaning up."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class SlurmCluster:
    def __init__(self, cpus: int | None = None):
        # munged insists every directory above its socket is searchable by all: not pytest's
        # 0700 tmp_path, so a directory of our own under /tmp.
        self.root = Path(tempfile.mkdtemp(prefix="lws-slurm-"))
        self.root.chmod(0o755)
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for var in [v for v in self.env if v.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if var != "SLURM_CONF":  # a test session inside a SLURM job must not leak its job here
                del self.env[var]
        self.procs: dict[str, subprocess.Popen] = {}
        self.jobs: list[str] = []

    # ---- set-up ----
    def _write_files(self) -> None:
        r = self.root
        for sub, mode in (
            ("munge", 0o700),
            ("run", 0o755),
            ("state", 0o755),
            ("spool", 0o755),
            ("log", 0o755),
        ):
            (r / sub).mkdir(mode=mode)
            (r / sub).chmod(mode)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        user = "root"
        self.conf.write_text(
            "\n".join(
                [
                    "# A one-node test cluster written by tests/launch/slurm_cluster.py",
                    "ClusterName=lwstest",
                    f"SlurmctldHost={NODE}(127.0.0.1)",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    f"SlurmUser={user}",
                    f"SlurmdUser={user}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    # cred_expire also delays a requeued job's restart (120 s by default)
                    f"AuthInfo=socket={r}/run/munge.socket,cred_expire=5",
                    f"StateSaveLocation={r}/state",
                    f"SlurmdSpoolDir={r}/spool",
                    f"SlurmctldPidFile={r}/run/slurmctld.pid",
                    f"SlurmdPidFile={r}/run/slurmd.pid",
                    f"SlurmctldLogFile={r}/log/slurmctld.log",
                    f"SlurmdLogFile={r}/log/slurmd.log",
                    "SlurmctldDebug=info",
                    "SlurmdDebug=info",
                    "MailProg=/bin/true",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "SchedulerType=sched/builtin",
                    "SchedulerParameters=sched_interval=2",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "JobRequeue=1",
                    "KillWait=10",
                    "MinJobAge=600",
                    f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={self.cpus} "
                    f"RealMemory={max(_memory_mb() - 512, 256)} State=UNKNOWN",
                    f"PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(
            [tool(argv[0]), *argv[1:]],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        out.close()

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs()}")

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        self._write_files()
        r = self.root
        try:
            self._spawn(
                "munged",
                [
                    "munged",
                    "--foreground",
                    f"--socket={r}/run/munge.socket",
                    f"--key-file={r}/munge/munge.key",
                    f"--pid-file={r}/run/munged.pid",
                    f"--seed-file={r}/munge/munged.seed",
                    f"--log-file={r}/log/munged.log",
                ],
            )
            self._wait(lambda: (r / "run" / "munge.socket").exists(), timeout, "munged's socket")
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._wait(
                lambda: self._run(["scontrol", "ping"]).returncode == 0,
                timeout,
                "slurmctld to answer",
            )
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", NODE])
            self._wait(
                lambda: self._run(["sinfo", "-h", "-N", "-o", "%t"]).stdout.strip() == "idle",
                timeout,
                "the node to be idle",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _run(self, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        argv = [tool(argv[0]) or argv[0], *argv[1:]]
        return subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}")
            time.sleep(0.3)

    # ---- use ----
    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """A client command (sbatch, squeue, scontrol ...) against this cluster."""
        proc = self._run(list(argv))
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def track(self, job_id: str) -> str:
        """Remember a job this test submitted, so that stop() cancels it."""
        self.jobs.append(job_id)
        return job_id

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once it's gone."""
        proc = self._run(["scontrol", "show", "job", "-o", job_id])
        if proc.returncode != 0:
            return {}
        fields = {}
        for item in proc.stdout.split():
            key, sep, value = item.partition("=")
            if sep:
                fields.setdefault(key, value)
        return fields

    def wait_job(self, job_id: str, timeout: float, until=None) -> dict[str, str]:
        """Wait until the job ended (or `until(fields)` holds); return its fields."""
        ended = {
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "BOOT_FAIL",
            "DEADLINE",
            "PREEMPTED",
        }
        until = until or (lambda f: f.get("JobState") in ended)
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            if until(fields):
                return fields
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} still {fields.get('JobState')} after "
                    f"{timeout:.0f} s:\n{fields}\n{self.logs()}"
                )
            time.sleep(0.5)

    def logs(self, lines: int = 30) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name} ---\n" + "\n".join(text))
        return "\n".join(parts)

    # ---- tear-down ----
    def stop(self) -> None:
        """Cancel this cluster's jobs, wait for them to leave the node, stop the daemons by pid."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            queued = self._run(["squeue", "-h", "-o", "%A"]).stdout.split()
            jobs = sorted(set(queued) | set(self.jobs))
            if jobs:
                self._run(["scancel", *jobs])
                deadline = time.monotonic() + 60
                while (
                    self._run(["squeue", "-h", "-o", "%A"]).stdout.strip()
                    and time.monotonic() < deadline
                ):
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm_cluster():
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()
