"""A step's numbers stay on the device; the trainer reads them once per log interval.

Reading a loss or a gradient norm makes the host wait for the device, and the host then
launches the next step onto an idle GPU. So each step only adds its device-resident numbers to
running sums here, and `read` brings every number of the interval over in one transfer, at the
steps where the host needs them anyway (logging, evaluation, checkpoints, the end). A metric
is recorded by name (`StepStats.record`, `Trainer.record_metric`, or an entry of a
`StepResult`) and appears under that name in `metrics.jsonl`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch

from lws_megatron.training.schedule import Due

Reduce = Literal["mean", "last"]  # how a metric's values over a log interval become one number


@dataclass(frozen=True)
class StepResult:
    """One optimizer step, on the device: nothing here has been waited for."""

    skipped: torch.Tensor  # 1.0 when the update was not applied (a non-finite loss or gradient)
    metrics: dict[str, tuple[torch.Tensor, Reduce]]  # by their names in metrics.jsonl

    @property
    def loss(self) -> torch.Tensor:
        """Mean loss per token of the global batch (NaN or inf when it was)."""
        return self.metrics["loss"][0]


@dataclass(frozen=True)
class Interval:
    """The steps since the previous read, as host numbers."""

    steps: int
    seconds: float  # wall time of those steps, evaluation and checkpoints left out
    skipped: int
    nonfinite_run: int  # the longest run of consecutive non-finite steps that ended in it
    metrics: dict[str, float] = field(default_factory=dict)  # reduced since the last log read
    slowest_prior_step_s: float = math.inf  # the `slowest` given to the read
    # Filled in by the trainer: what the last step is due for, and, by global rank (gathered
    # on the host), seconds in forward passes over the interval and peak memory in GB.
    due: Due = Due()
    rank_forward_s: tuple[float, ...] = ()
    rank_mem_gb: tuple[float, ...] = ()

    @property
    def step_seconds(self) -> float:
        return self.seconds / self.steps


class StepStats:
    """Running sums of the steps since the last read, on the device; the metrics' sums are
    added up on the host until the read that ends a log interval."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._bad_run = torch.zeros((), device=device)  # carries across reads
        self._on_host: dict[str, tuple[Reduce, list[float]]] = {}  # since the last log read
        self._reset()

    def _reset(self) -> None:
        zero = torch.zeros((), device=self.device)
        self._skipped, self._longest_run = zero.clone(), zero.clone()
        self._on_device: dict[str, tuple[Reduce, list[torch.Tensor]]] = {}
        self.steps = 0

    def add(self, result: StepResult) -> None:
        """A step's metrics count as NaN when it was skipped: left out of means."""
        skipped = result.skipped.float()
        self._skipped += skipped
        self._bad_run = (self._bad_run + 1) * skipped
        self._longest_run = torch.maximum(self._longest_run, self._bad_run)
        for name, (value, reduce) in result.metrics.items():
            self.record(name, torch.where(skipped > 0, math.nan, value.float()), reduce)
        self.steps += 1

    def record(self, name: str, value: torch.Tensor, reduce: Reduce) -> None:
        """`value`: a number on the device, not read here. "mean": of the finite values until
        the log step (NaN when none was); "last": the latest value."""
        value = value.detach().float().reshape(())
        if reduce == "last":
            parts = [value]
        elif reduce == "mean":
            finite = torch.isfinite(value)
            total, count = self._on_device[name][1] if name in self._on_device else (0.0, 0.0)
            parts = [total + torch.where(finite, value, 0.0), count + finite]
        else:
            raise ValueError(f"metric {name!r}: reduce {reduce!r} is not 'mean' or 'last'")
        self._on_device[name] = (reduce, parts)

    def read(self, began: float, slowest: torch.Tensor | None = None, log: bool = True) -> Interval:
        """The interval's numbers, in the one transfer from the device; then a new interval.
        `began`: its `time.perf_counter()` at the start (timed once the device is done);
        `slowest`: a device number read in the same transfer (the trainer's pacing); `log`:
        the read ends a log interval, so the metrics start over."""
        if slowest is None:
            slowest = torch.full((), math.inf, device=self.device)
        parts = [part for _, values in self._on_device.values() for part in values]
        fixed = [self._skipped, self._longest_run, slowest.float().reshape(())]
        host = iter(torch.stack(fixed + parts).tolist())
        skipped, longest, pace = next(host), next(host), next(host)
        for name, (reduce, values) in self._on_device.items():
            read = [next(host) for _ in values]
            if reduce == "mean" and name in self._on_host:
                read = [a + b for a, b in zip(self._on_host[name][1], read)]
            self._on_host[name] = (reduce, read)
        metrics = {name: _reduced(reduce, v) for name, (reduce, v) in self._on_host.items()}
        interval = Interval(
            steps=self.steps,
            seconds=time.perf_counter() - began,
            skipped=round(skipped),
            nonfinite_run=round(longest),
            metrics=metrics,
            slowest_prior_step_s=pace,
        )
        self._reset()
        if log:
            self._on_host = {}
        return interval


def _reduced(reduce: Reduce, values: list[float]) -> float:
    if reduce == "last":
        return values[0]
    total, count = values
    return total / count if count else math.nan


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
