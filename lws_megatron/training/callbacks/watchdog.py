"""Warn when a step takes far longer than usual: a straggler, a throttled GPU, a file system
stall or a recompile. Optional: `train.callbacks: [step_time_watchdog]`."""

from __future__ import annotations

import statistics
from collections import deque

from lws_megatron.training.callbacks.base import Callback, registered


@registered("step_time_watchdog")
class StepTimeWatchdog(Callback):
    factor = 3.0  # a step slower than this many times the median is reported
    window = 50  # steps the median is taken over
    warmup = 5  # steps before the first judgement (compiles, caches)

    def __init__(self) -> None:
        self.times: deque[float] = deque(maxlen=self.window)
        self.slow_steps = 0

    def on_step_end(self, trainer, result, seconds) -> None:
        if len(self.times) >= self.warmup:
            median = statistics.median(self.times)
            if seconds > self.factor * median:
                self.slow_steps += 1
                trainer.say(
                    f"warning: step {trainer.step} took {seconds:.3f} s, "
                    f"{seconds / median:.1f}x the median {median:.3f} s of the last "
                    f"{len(self.times)} steps"
                )
        self.times.append(seconds)
