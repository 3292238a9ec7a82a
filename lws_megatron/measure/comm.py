"""How long a data-parallel step waits for communication, split at two points the train module
passes through: the schedule's `finalize` (the gradient buckets still being reduced when
backward ends) and the optimizer step (at ZeRO >= 1, DeepSpeed's update of this rank's shard
and the all-gather of the updated weights).

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

    def median_ms(self, last: int) -> float:
        marks = self.marks[-last:]
        if self.cuda:
            return statistics.median(a.elapsed_time(b) for a, b in marks)
        return statistics.median(1000 * (b - a) for a, b in marks)


class CommWaits:
    """Spans timed on a built train module while attached (`with CommWaits(module) as w:`)."""

    def __init__(self, module) -> None:
        self.module = module
        cuda = module.device.type == "cuda"
        self.grads, self.optimizer = _Spans(cuda), _Spans(cuda)

    def __enter__(self) -> "CommWaits":
        config, engine = self.module.model[0].config, self.module.engine
        self._finalize, self._step = config.finalize_model_grads_func, engine.step
        config.finalize_model_grads_func = self.grads.around(self._finalize)
        engine.step = self.optimizer.around(self._step)
        return self

    def __exit__(self, *_) -> None:
        self.module.model[0].config.finalize_model_grads_func = self._finalize
        self.module.engine.step = self._step

    def medians_ms(self, steps: int) -> tuple[float, float]:
        """(waiting for gradients, optimizer with the weight gather) over the last `steps`."""
        return self.grads.median_ms(steps), self.optimizer.median_ms(steps)
