"""A step's numbers stay on the device; the trainer reads them once per log interval.

Reading a loss or a gradient norm makes the host wait for the device, and the host then
launches the next step onto an idle GPU. So each step only adds its device-resident result to
running sums here, and `read` brings every number of the interval over in one transfer, at the
steps where the host needs them anyway (logging, evaluation, checkpoints, the end).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class StepResult:
    """One optimizer step, on the device: nothing here has been waited for."""

    loss: torch.Tensor  # mean loss per token of the global batch (NaN or inf when it was)
    grad_norm: torch.Tensor  # NaN for a skipped step
    skipped: torch.Tensor  # 1.0 when the update was not applied (a non-finite loss or gradient)


@dataclass(frozen=True)
class Interval:
    """The steps since the previous read, as host numbers."""

    steps: int
    seconds: float  # wall time of those steps, evaluation and checkpoints left out
    applied: int  # steps whose update was applied
    loss: float  # mean over the applied steps; NaN when none was applied
    grad_norm: float  # of the last step; NaN when it was skipped
    skipped: int
    nonfinite_run: int  # the longest run of consecutive non-finite steps that ended in it
    slowest_prior_step_s: float = math.inf  # the `slowest` given to the read
    # By global rank (filled in by the trainer, gathered on the host): seconds in forward
    # passes over the interval, and peak memory in GB.
    rank_forward_s: tuple[float, ...] = ()
    rank_mem_gb: tuple[float, ...] = ()

    @property
    def step_seconds(self) -> float:
        return self.seconds / self.steps


class StepStats:
    """Running sums of the steps since the last read, on the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._bad_run = torch.zeros((), device=device)  # carries across reads
        self._reset()

    def _reset(self) -> None:
        zero = torch.zeros((), device=self.device)
        self._loss_sum, self._applied, self._skipped = zero.clone(), zero.clone(), zero.clone()
        self._longest_run = zero.clone()
        self._grad_norm = torch.full((), math.nan, device=self.device)
        self.steps = 0

    def add(self, result: StepResult) -> None:
        bad = torch.maximum(result.skipped, (~torch.isfinite(result.loss)).float())
        self._loss_sum += torch.where(bad > 0, 0.0, result.loss)
        self._applied += 1 - bad
        self._skipped += result.skipped
        self._bad_run = (self._bad_run + 1) * bad
        self._longest_run = torch.maximum(self._longest_run, self._bad_run)
        self._grad_norm = result.grad_norm
        self.steps += 1

    def read(self, began: float, slowest: torch.Tensor | None = None) -> Interval:
        """The interval's numbers, in the one transfer from the device; then a new interval.
        `began`: its `time.perf_counter()` at the start (timed once the device is done);
        `slowest`: a device number read in the same transfer (the trainer's pacing)."""
        if slowest is None:
            slowest = torch.full((), math.inf, device=self.device)
        loss_sum, applied, skipped, longest, norm, pace = torch.stack(
            [
                self._loss_sum,
                self._applied,
                self._skipped,
                self._longest_run,
                self._grad_norm.float(),
                slowest.float().reshape(()),
            ]
        ).tolist()
        interval = Interval(
            steps=self.steps,
            seconds=time.perf_counter() - began,
            applied=round(applied),
            loss=loss_sum / applied if applied else math.nan,
            grad_norm=norm,
            skipped=round(skipped),
            nonfinite_run=round(longest),
            slowest_prior_step_s=pace,
        )
        self._reset()
        return interval


class StopRequests:
    """How many ranks asked to stop (a signal, a dead loader worker) at the step just queued:
    the count rides in the step's first collective (`forward.step_totals`), is copied to
    pinned host memory behind it, and is read once that collective is done on the device.

    Every rank reads the same all-reduced count at the same step, so all stop after the step
    whose collective carried the request: one step after the signal. The read waits for the
    start of the step just queued (the end of the one before), never for the step itself, so
    the host stays at most one step ahead and the device is never left idle.
    """

    def __init__(self, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self._count = torch.zeros((), dtype=torch.int32, pin_memory=cuda)
        self._done = torch.cuda.Event() if cuda else None

    def record(self, count: torch.Tensor) -> None:
        """Behind the step's all-reduced count, on the device's queue."""
        self._count.copy_(count.to(torch.int32), non_blocking=True)
        if self._done is not None:
            self._done.record()

    def any(self) -> bool:
        if self._done is not None:
            self._done.synchronize()
        return int(self._count) > 0


class ForwardClock:
    """This rank's forward passes, timed and summed until `seconds` is asked: a slow rank stands
    out by them, where the step time (set by the slowest rank, which the others wait for) is
    the same on every rank. The forward is the part of a step that waits for no other rank with
    DP and PP (the gradient reductions run in and after backward, a stage's sends and receives
    around its forward), as in Megatron-Core's `StragglerDetector`; with TP a slow rank slows
    its TP group's forward too. On CUDA timed by events on the device, read once the
    interval's numbers have been."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        # (sign, start, end) per span on CUDA; the host clock's sum on a CPU.
        self._spans: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = 0.0

    def timed(self):
        return self._span(+1)

    def excluded(self):
        """A wait inside the forward for the other ranks (ZeRO's weight gather), left out."""
        return self._span(-1)

    @contextlib.contextmanager
    def _span(self, sign: int) -> Iterator[None]:
        if not self.cuda:
            began = time.perf_counter()
            yield
            self._seconds += sign * (time.perf_counter() - began)
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._spans.append((sign, start, end))

    def seconds(self) -> float:
        """The time since the last call; on CUDA only once the device has done those steps."""
        timed = sum(sign * a.elapsed_time(b) for sign, a, b in self._spans)
        total = self._seconds + timed / 1000
        self._spans, self._seconds = [], 0.0
        return total
