"""Training batches built ahead of the step that needs them, in background workers.

The data position is the step (`data.step_batches`): a torch DataLoader over steps, its sampler
counting from the resumed step, keeps that exactly, while `data.num_workers` processes read
and stack the samples, count the loss tokens on the host and (on CUDA) pin the batches, so the
forward step's copy to the device is queued without a host wait.

The workers survive what ends a run cleanly: SIGTERM, SIGINT and SIGUSR1 sent to the whole
process group (`kill -- -PGID`, `timeout`, SLURM) are ignored there (the training process
checkpoints and shuts them down). A worker that dies (SIGKILL, the kernel's OOM killer) does
not take the trainer down with an exception raised at a random point (what torch's SIGCHLD
handler does): the death is found at the next step, that step and the rest are built in the
training process, and `lost` says what happened, for the trainer to checkpoint and stop.
A trainer that dies takes its workers with it.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from lws_megatron.training.data import Batch, step_batches
from lws_megatron.training.distributed import ParallelPlan
from lws_megatron.training.forward import loss_tokens

PREFETCH_STEPS = 2  # batches each worker keeps ready
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class StepData(NamedTuple):
    step: int
    batches: list[Batch]  # this data-parallel rank's micro batches of the step's global batch
    loss_tokens: int  # their loss tokens, counted on the host


class StepBatches(Dataset):
    """Item k: this data-parallel rank's micro batches of global batch k."""

    def __init__(self, dataset, plan: ParallelPlan, dp_rank: int) -> None:
        self.dataset, self.plan, self.dp_rank = dataset, plan, dp_rank

    def __getitem__(self, step: int) -> StepData:
        batches = step_batches(self.dataset, step, self.plan, self.dp_rank)
        return StepData(step, batches, loss_tokens(batches))


def _init_worker(worker_id: int) -> None:
    """In each worker, before it reads anything: the stop signals are the trainer's, and so is
    the word on a trainer that is gone (`_quiet_when_the_trainer_left`)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    sys.excepthook = _quiet_when_the_trainer_left
    _end_with_the_trainer()


def _end_with_the_trainer() -> None:
    """A trainer killed outright (SIGKILL, the OOM killer) takes its workers with it at once.
    Without this they read on until torch's watchdog looks, every 5 s and only between
    samples, holding the job's output pipes and memory, and a worker stuck on a slow read
    outlives its trainer for as long as the read takes."""
    trainer = multiprocessing.parent_process().pid
    # A worker that a fork server started (a trainer whose start method is "forkserver") is
    # the server's child, and the kernel can tie it only to its parent.
    if not sys.platform.startswith("linux") or os.getppid() != trainer:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != trainer:  # it died before the prctl
        os._exit(1)


def _quiet_when_the_trainer_left(kind, error, trace) -> None:
    """A worker hands a batch's shared memory over from a thread of `multiprocessing`'s
    resource sharer, which prints any error it meets as a traceback. The only peer it talks to
    is the trainer, so a connection that breaks there means the trainer died (a SIGKILL, the
    OOM killer), and the worker, about to end with it, says nothing."""
    if not issubclass(kind, (ConnectionError, EOFError)):
        sys.__excepthook__(kind, error, trace)


def _wait_for_ending_threads(limit_s: float = 1.0) -> None:
    """CPython up to 3.11 without the fix of python/cpython#112275 (3.11.7, CI's, is one)
    copies the lock of its thread list into a forked child as it was, and a child forked while
    another thread was ending (which holds that lock a moment, after `join` has returned)
    hangs before it runs a line: a loader worker that never answers. So the workers fork only
    once every thread the interpreter lists is a live one (at most `limit_s`: a thread that C
    code started, which `threading` does not list, ends the wait)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        alive = {thread.ident for thread in threading.enumerate()}
        if set(sys._current_frames()) <= alive:  # takes, so waits for, the list's lock
            return
        time.sleep(0.001)


class StepLoader:
    """Steps first_step .. max_steps-1 in order; with `num_workers` 0, built when asked for."""

    def __init__(
        self,
        dataset,
        plan: ParallelPlan,
        dp_rank: int,
        first_step: int,
        max_steps: int,
        num_workers: int,
        device: torch.device,
    ) -> None:
        self.items = StepBatches(dataset, plan, dp_rank)
        self.next_step, self.max_steps = first_step, max_steps
        self.lost: str | None = None  # what happened to a worker that died
        self._iterator = None
        if num_workers and first_step < max_steps:
            self._iterator = self._start(device, num_workers, first_step)

    def _start(self, device: torch.device, num_workers: int, first_step: int):
        loader = DataLoader(
            self.items,
            batch_size=None,
            sampler=range(first_step, self.max_steps),
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=PREFETCH_STEPS,
            worker_init_fn=_init_worker,
        )
        # Blocked across the fork, so a signal in the instant before a worker ignores it waits
        # there (and is then ignored) and here (and is then handled).
        sigchld = signal.getsignal(signal.SIGCHLD)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            _wait_for_ending_threads()
            iterator = iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            signal.signal(signal.SIGCHLD, sigchld)  # torch's raises from wherever the trainer is
        return iterator

    def __iter__(self) -> StepLoader:
        return self

    def __next__(self) -> StepData:
        if self._iterator is not None:
            item = self._from_workers()
            if item is not None:
                self.next_step = item.step + 1
                return item
        if self.next_step >= self.max_steps:
            raise StopIteration
        item = self.items[self.next_step]
        self.next_step += 1
        return item

    def _from_workers(self) -> StepData | None:
        """The next step from the workers; None once one of them has died."""
        if self._dead_worker() is None:
            try:
                return next(self._iterator)
            except RuntimeError:  # torch's "worker exited unexpectedly", or a worker's own error
                if self._dead_worker() is None:
                    raise
            except (OSError, EOFError):  # a worker killed while it handed over shared memory
                if self._death_within(seconds=5.0) is None:
                    raise
        self.lost = self._dead_worker()
        self.close()
        return None

    def _death_within(self, seconds: float) -> str | None:
        """A worker that has died, waiting a moment for one whose sockets closed but the kernel
        has not reaped yet."""
        deadline = time.monotonic() + seconds
        while (dead := self._dead_worker()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return dead

    def _dead_worker(self) -> str | None:
        for index, worker in enumerate(self._iterator._workers):
            code = worker.exitcode
            if code is not None:
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
                hint = " (the kernel's out-of-memory killer?)" if code == -signal.SIGKILL else ""
                return f"data loader worker {index} (pid {worker.pid}) died: {how}{hint}"
        return None

    def close(self) -> None:
        """Shut the workers down; any that does not end (they ignore SIGTERM) is killed."""
        if self._iterator is None:
            return
        iterator, self._iterator = self._iterator, None
        iterator._shutdown_workers()
        for worker in iterator._workers:
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)
