"""Warn when steps take far longer than usual: a straggler, a throttled GPU, a file system
stall or a recompile. Optional: `train.callbacks: [step_time_watchdog]`.

Step times are known per read of the device (`Trainer.read_due`), so it judges each interval's
mean step time against the median of the intervals before it."""

from __future__ import annotations

import statistics
from collections import deque

from lws_megatron.training.callbacks.base import Callback, registered


@registered("step_time_watchdog")
class StepTimeWatchdog(Callback):
    factor = 3.0  # an interval this many times slower per step than the median is reported
    window = 50  # intervals the median is taken over
    warmup = 5  # intervals before the first judgement (compiles, caches)

    def __init__(self) -> None:
        self.times: deque[float] = deque(maxlen=self.window)
        self.slow_intervals = 0

    def on_interval_end(self, trainer, interval) -> None:
        seconds = interval.step_seconds
        if len(self.times) >= self.warmup:
            median = statistics.median(self.times)
            if seconds > self.factor * median:
                self.slow_intervals += 1
                first = trainer.step - interval.steps + 1
                steps = f"step {first}" if interval.steps == 1 else f"steps {first}-{trainer.step}"
                trainer.say(
                    f"warning: {steps} took {seconds:.3f} s per step, {seconds / median:.1f}x the "
                    f"median {median:.3f} s of the last {len(self.times)} intervals"
                )
        self.times.append(seconds)
