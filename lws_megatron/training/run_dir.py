"""The run directory's guard: one run at a time, and no run over another run's records.

Rank 0 holds an advisory lock (`run.dir/.lock`, flock) for the whole run; the kernel drops it
when the process dies, so a killed run never blocks its own resume. The file also names its
holder, which is how a lock that another host may still hold (flock may not reach across
nodes on every network filesystem) is reported.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
from datetime import datetime, timezone
from pathlib import Path

import yaml

from lws_megatron.errors import UserError
from lws_megatron.fileio import ensure_dir, os_errors, write_text_atomic

_HELD: set[int] = set()  # lock descriptors of this process


def _drop_in_child() -> None:
    """A forked child (a loader worker) shares the lock's open file; were it to keep it, a run
    killed with SIGKILL would stay locked until its orphaned workers noticed and exited."""
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_in_child)


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; a note when it was left behind by a run that did not release it."""
        ensure_dir(self.path.parent)
        with os_errors(self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read(fd)
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise UserError(
                f"{self.path.parent} is in use by another run ({_describe(holder)}); "
                "wait for it to end, or give this run another run.dir"
            ) from None
        holder = _read(fd)
        if holder and holder.get("host") != socket.gethostname():
            os.close(fd)
            raise UserError(
                f"{self.path} says a run on host {holder.get('host')} ({_describe(holder)}) holds "
                f"{self.path.parent}; if that run has ended, delete {self.path} and launch again"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_me()).encode(), 0)
        self._fd = fd
        _HELD.add(fd)
        return (
            (
                f"note: {self.path} was left by {_describe(holder)}, which ended without "
                "releasing it; this run takes it over"
            )
            if holder
            else None
        )

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        _HELD.discard(self._fd)
        os.close(self._fd)
        self._fd = None


def _me() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _read(fd: int) -> dict | None:
    raw = os.pread(fd, 4096, 0)
    try:
        holder = json.loads(raw) if raw.strip() else None
    except ValueError:
        return {"pid": "?", "host": "?", "started": "?"}
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "a process that left no record"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


# Keys that say how a run is launched, not what it computes: a run that died before its first
# checkpoint and is started again with one of them changed is still the same run.
_LAUNCH_KEYS = {
    "run.collective_timeout_s",
    "data.num_workers",
    "train.max_steps",
    "train.log_interval",
    "train.callbacks",
    "checkpoint.interval",
    "checkpoint.keep",
}


def refuse_foreign_records(
    run_dir: Path, resume: bool, has_checkpoint: bool, config: dict | None = None
) -> bool:
    """A run that starts from step 0 must not mix with records an earlier run left in run.dir.

    Records without any checkpoint ever saved are this run's own when `config` (the resolved
    config, as a dict) matches the `config.yaml` beside them: the run died before its first
    save (a SLURM requeue or a torchrun restart starts it again). Then True: the caller starts
    from step 0 and replaces them (`clear_records`)."""
    metrics = run_dir / "metrics.jsonl"
    written = metrics.is_file() and metrics.stat().st_size > 0
    if has_checkpoint and not resume:
        raise UserError(
            f"{run_dir} holds checkpoints of an earlier run and checkpoint.resume=false: a fresh "
            "run there would mix with them; resume it (checkpoint.resume=true) or give this run "
            "a new run.dir"
        )
    if not written or has_checkpoint:
        return False
    saved = run_dir / "checkpoints"
    if config is None or (saved / "latest").exists() or any(saved.glob("step_*")):
        raise UserError(
            f"{metrics} holds the metrics of an earlier run, but {saved} has no complete "
            "checkpoint to resume from; give this run a new run.dir (or delete that run's "
            "records to start it again)"
        )
    differ = _config_difference(run_dir / "config.yaml", config)
    if differ:
        raise UserError(
            f"{metrics} holds the metrics of another run that saved no checkpoint ({differ}); "
            "give this run a new run.dir, or run that config to start it again"
        )
    return True


def _config_difference(path: Path, config: dict) -> str | None:
    """The first key, outside `_LAUNCH_KEYS`, where the config saved at `path` differs."""
    try:
        saved = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict):
        return f"{path} is missing or unreadable"
    ours, theirs = _flat(config), _flat(saved)
    for key in sorted(set(ours) | set(theirs)):
        if key not in _LAUNCH_KEYS and ours.get(key) != theirs.get(key):
            return f"{key}: {theirs.get(key)!r} there, {ours.get(key)!r} here"
    return None


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def clear_records(run_dir: Path) -> None:
    """Rank 0: the records of a run that died before its first checkpoint, which starts again."""
    with os_errors(run_dir):
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)


def trim_metrics(run_dir: Path, step: int) -> None:
    """Drop the records of steps after `step` (a resumed run logs them again)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return
    lines = metrics.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        write_text_atomic(metrics, "".join(f"{line}\n" for line in kept))
