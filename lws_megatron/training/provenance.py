"""What a run was made with, for run_info.json: the code's commit, the library versions, the
launcher and the world it ran on, so that a result can be traced and run again."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch.distributed as dist

import lws_megatron

ROOT = Path(lws_megatron.__file__).resolve().parents[1]
PACKAGES = ("torch", "megatron-core", "deepspeed", "transformers")
# The launcher's own record of the attempt: torchrun's restarts, SLURM's requeues.
_LAUNCH_VARIABLES = {
    "torchrun_restart": "TORCHELASTIC_RESTART_COUNT",
    "torchrun_max_restarts": "TORCHELASTIC_MAX_RESTARTS",
    "slurm_job_id": "SLURM_JOB_ID",
    "slurm_restart": "SLURM_RESTART_COUNT",
}


def git_commit(root: Path = ROOT) -> dict[str, Any] | None:
    """The checkout's commit and whether tracked files differ from it; None when the code is
    not a git checkout (an installed wheel) or git is not there."""
    if not (root / ".git").exists():
        return None
    try:
        commit = _git(root, "rev-parse", "HEAD")
        changed = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(changed)}


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {
        "python": platform.python_version(),
        "lws_megatron": lws_megatron.__version__,
    }
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def world(launcher: str, group=None) -> dict[str, Any]:
    """Collective: the job's processes and the hosts they ran on."""
    hosts: list = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    per_host = {host: hosts.count(host) for host in dict.fromkeys(hosts)}
    return {
        "launcher": launcher,
        **{k: os.environ[v] for k, v in _LAUNCH_VARIABLES.items() if v in os.environ},
        "world_size": len(hosts),
        "nodes": len(per_host),
        "processes_per_node": per_host,
    }
