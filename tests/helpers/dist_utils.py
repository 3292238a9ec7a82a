"""Run a function on several real processes joined in a gloo process group (for tests).

`run_distributed(fn, world_size, *args)` spawns `world_size` fresh Python processes, joins them
in a default process group on gloo (a FileStore in a temporary folder: no ports to collide), runs
`fn(*args)` on each and returns the list of their results, by rank. `fn` and its arguments must
be picklable: `fn` a module-level function of an importable module (a test module is fine). A
rank that raises fails the call with every failing rank's traceback; a run past `timeout`
seconds is killed. Each process gets `threads` torch threads, so that N ranks share few cores.

The processes fork from a server that imported torch, Megatron-Core and DeepSpeed once per test
session (`multiprocessing`'s forkserver): a fresh interpreter spends 5-8 s of CPU on those
imports, which a suite of a few hundred ranks would pay every time. Each rank still starts as a
spawned one would: in the caller's environment and folder of the moment, its output replayed on
the caller's stdout and stderr (where pytest's capfd reads it) once the ranks are done.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

PRELOAD = ["torch", "megatron.core", "deepspeed", "lws_megatron.training.trainer"]


class DistributedFailure(AssertionError):
    """Some rank raised, died or timed out; the message holds each failing rank's story."""


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 600.0,
    threads: int = 1,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """`fn(*args)` on ranks 0..world_size-1 of a fresh gloo group; their results in rank order."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    caller = ({**os.environ, **(env or {})}, os.getcwd())
    with tempfile.TemporaryDirectory(prefix="dist-") as tmp:
        workdir = Path(tmp)
        procs = [
            context.Process(
                target=_worker,
                args=(fn, args, rank, world_size, str(workdir), threads, timeout, caller),
                name=f"rank{rank}",
            )
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        timed_out = _wait(procs, time.monotonic() + timeout)
        _replay_output(workdir, world_size)
        failures = []
        for rank, proc in enumerate(procs):
            error = workdir / f"error-{rank}.txt"
            if error.exists():
                failures.append(f"--- rank {rank} raised:\n{error.read_text()}")
            elif proc.exitcode != 0:
                why = "timed out" if timed_out else f"exited with code {proc.exitcode}"
                failures.append(f"--- rank {rank} {why}")
        if failures:
            raise DistributedFailure(
                f"{fn.__name__} on {world_size} processes failed:\n" + "\n".join(failures)
            )
        return [
            torch.load(workdir / f"result-{rank}.pt", weights_only=False)
            for rank in range(world_size)
        ]


def _wait(procs: list[multiprocessing.Process], deadline: float) -> bool:
    """Wait for all ranks; once one fails, give the rest a moment, then stop them. True: timeout."""
    failed_at = None
    while any(proc.is_alive() for proc in procs):
        now = time.monotonic()
        if failed_at is None and any(proc.exitcode not in (None, 0) for proc in procs):
            failed_at = now
        if now > deadline or (failed_at is not None and now - failed_at > 5.0):
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
            for proc in procs:
                proc.join()
            return now > deadline
        time.sleep(0.05)
    for proc in procs:
        proc.join()
    return False


def _worker(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    rank: int,
    world_size: int,
    workdir: str,
    threads: int,
    timeout: float,
    caller: tuple[dict[str, str], str],
) -> None:
    _start_like_the_caller(Path(workdir), rank, *caller)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{workdir}/store",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        result = fn(*args)
        torch.save(result, Path(workdir) / f"result-{rank}.pt")
    except BaseException:
        (Path(workdir) / f"error-{rank}.txt").write_text(traceback.format_exc())
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()


_OUTPUTS = ((1, "stdout"), (2, "stderr"))


def _start_like_the_caller(workdir: Path, rank: int, environ: dict[str, str], cwd: str) -> None:
    """A forked rank has the server's environment, folder and output: take the caller's."""
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    for fd, name in _OUTPUTS:
        target = os.open(workdir / f"{name}-{rank}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)


def _replay_output(workdir: Path, world_size: int) -> None:
    for rank in range(world_size):
        for fd, name in _OUTPUTS:
            path = workdir / f"{name}-{rank}.txt"
            if path.exists():
                with open(fd, "wb", closefd=False) as out:
                    out.write(path.read_bytes())


@contextlib.contextmanager
def built_model(config, device: str = "cpu") -> Iterator[torch.nn.Module]:
    """The one model chunk of `config` inside Megatron's groups over the joined default group."""
    from lws_megatron.model import build_model
    from lws_megatron.training.distributed import model_parallel
    from lws_megatron.training.train_module import model_args

    with model_parallel(config) as plan:
        args = model_args(config, plan, torch.device(device))
        yield build_model(args, seed=config.train.seed, device=device)
