"""How long a data-parallel step waits for communication, split at the points the train module
passes through: the schedule's `finalize` (the gradient buckets still being reduced when
backward ends), the optimizer step (at ZeRO >= 1, DeepSpeed's update of this rank's shard, with
the all-gather of the updated weights where `zero.overlap_param_gather` is off), and the
forward's waits for that all-gather where it is on (summed per step).

On CUDA each span is a pair of events on the compute stream, so it is the time the device
stalled there and nothing waits for the device between steps; on a CPU it is the host clock.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


class _Spans:
    def __init__(self, cuda: bool) -> None:
        self.cuda, self.marks = cuda, []

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def around(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = self._mark()
            try:
                return fn(*args, **kwargs)
            finally:
                self.marks.append((start, self._mark()))

        return timed

    def _ms(self, mark) -> float:
        start, end = mark
        return start.elapsed_time(end) if self.cuda else 1000 * (end - start)

    def median_ms(self, last: int) -> float:
        return statistics.median(self._ms(m) for m in self.marks[-last:])

    def median_step_sum_ms(self, last: int) -> float:
        """Spans between step boundaries (None marks) summed per step."""
        sums, current = [], 0.0
        for mark in self.marks:
            if mark is None:
                sums.append(current)
                current = 0.0
            else:
                current += self._ms(mark)
        return statistics.median(sums[-last:]) if sums else 0.0


class CommWaits:
    """Spans timed on a built train module while attached (`with CommWaits(module) as w:`)."""

    def __init__(self, module) -> None:
        self.module = module
        cuda = module.device.type == "cuda"
        self.grads, self.optimizer, self.gather = _Spans(cuda), _Spans(cuda), _Spans(cuda)
        self.weight_gather = module.weight_gather

    def __enter__(self) -> "CommWaits":
        config, engine = self.module.model[0].config, self.module.engine
        self._finalize, self._step = config.finalize_model_grads_func, engine.step
        config.finalize_model_grads_func = self.grads.around(self._finalize)
        step = self.optimizer.around(self._step)

        def step_and_mark(*args, **kwargs):
            self.gather.marks.append(None)
            return step(*args, **kwargs)

        engine.step = step_and_mark
        if self.weight_gather is not None:
            self.weight_gather.wait = self.gather.around(self.weight_gather.wait)
        return self

    def __exit__(self, *_) -> None:
        self.module.model[0].config.finalize_model_grads_func = self._finalize
        self.module.engine.step = self._step
        if self.weight_gather is not None:
            del self.weight_gather.wait  # the class's method again

    def medians_ms(self, steps: int) -> tuple[float, float, float]:
        """(waiting for gradients, the optimizer step, the forward waiting for the weight
        gather) over the last `steps`."""
        return (
            self.grads.median_ms(steps),
            self.optimizer.median_ms(steps),
            self.gather.median_step_sum_ms(steps),
        )
