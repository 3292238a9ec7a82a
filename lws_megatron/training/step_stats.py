"""A step's numbers stay on the device; the trainer reads them once per log interval.

Reading a loss or a gradient norm makes the host wait for the device, and the host then
launches the next step onto an idle GPU. So each step only adds its device-resident result to
running sums here, and `read` brings every number of the interval over in one transfer, at the
steps where the host needs them anyway (logging, evaluation, checkpoints, the end).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepResult:
    """One optimizer step, on the device: nothing here has been waited for."""

    loss: torch.Tensor  # mean loss per token of the global batch (NaN or inf when it was)
    grad_norm: torch.Tensor  # NaN for a skipped step
    skipped: torch.Tensor  # 1.0 when the update was not applied (a non-finite loss or gradient)
    stop_requested: torch.Tensor  # number of ranks that asked to stop (a pre-emption signal)


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
    stop_requested: bool
    slowest_prior_step_s: float = math.inf  # the `slowest` given to the read

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
        self._longest_run, self._stop = zero.clone(), zero.clone()
        self._grad_norm = torch.full((), math.nan, device=self.device)
        self.steps = 0

    def add(self, result: StepResult) -> None:
        bad = torch.maximum(result.skipped, (~torch.isfinite(result.loss)).float())
        self._loss_sum += torch.where(bad > 0, 0.0, result.loss)
        self._applied += 1 - bad
        self._skipped += result.skipped
        self._bad_run = (self._bad_run + 1) * bad
        self._longest_run = torch.maximum(self._longest_run, self._bad_run)
        self._stop = torch.maximum(self._stop, result.stop_requested)
        self._grad_norm = result.grad_norm
        self.steps += 1

    def read(self, began: float, slowest: torch.Tensor | None = None) -> Interval:
        """The interval's numbers, in the one transfer from the device; then a new interval.
        `began`: its `time.perf_counter()` at the start (timed once the device is done);
        `slowest`: a device number read in the same transfer (the trainer's pacing)."""
        if slowest is None:
            slowest = torch.full((), math.inf, device=self.device)
        loss_sum, applied, skipped, longest, stop, norm, pace = torch.stack(
            [
                self._loss_sum,
                self._applied,
                self._skipped,
                self._longest_run,
                self._stop,
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
            stop_requested=stop > 0,
            slowest_prior_step_s=pace,
        )
        self._reset()
        return interval
