"""Warn when steps take far longer than usual (a throttled GPU, a file system stall, a
recompile) and when one rank is slower than the others (a straggler), naming it. Optional:
`train.callbacks: [step_time_watchdog]`.

Step times are known per read of the device (`Trainer.read_due`), so it judges each interval's
mean step time against the median of the intervals before it. The step time is the slowest
rank's on every rank (the others wait for it), so ranks are compared by their time in forward
passes (`Interval.rank_forward_s`; metrics.jsonl has it at every log step as `slowest_rank`,
`slowest_rank_forward_s` and `median_rank_forward_s`)."""

from __future__ import annotations

import statistics
from collections import deque
from typing import TYPE_CHECKING

from lws_megatron.training.callbacks.base import Callback, registered

if TYPE_CHECKING:
    from lws_megatron.training.step_stats import Interval
    from lws_megatron.training.trainer import Trainer


@registered("step_time_watchdog")
class StepTimeWatchdog(Callback):
    factor = 3.0  # an interval this many times slower per step than the median is reported
    rank_factor = 1.25  # a rank this many times slower than the median rank is reported
    window = 50  # intervals the median is taken over
    warmup = 5  # intervals before the first judgement (compiles, caches)

    def __init__(self) -> None:
        self.times: deque[float] = deque(maxlen=self.window)
        self.slow_intervals = 0
        self.stragglers = 0

    def on_interval_end(self, trainer: Trainer, interval: Interval) -> None:
        seconds = interval.step_seconds
        first = trainer.step - interval.steps + 1
        steps = f"step {first}" if interval.steps == 1 else f"steps {first}-{trainer.step}"
        if len(self.times) >= self.warmup:
            median = statistics.median(self.times)
            if seconds > self.factor * median:
                self.slow_intervals += 1
                trainer.say(
                    f"warning: {steps} took {seconds:.3f} s per step, {seconds / median:.1f}x the "
                    f"median {median:.3f} s of the last {len(self.times)} intervals"
                )
            self._judge_ranks(trainer, interval, steps)
        self.times.append(seconds)

    def _judge_ranks(self, trainer: Trainer, interval: Interval, steps: str) -> None:
        forward = [s / interval.steps for s in interval.rank_forward_s]
        if len(forward) < 2:
            return
        slowest = max(range(len(forward)), key=forward.__getitem__)
        median = statistics.median(forward)
        if median > 0 and forward[slowest] > self.rank_factor * median:
            self.stragglers += 1
            trainer.say(
                f"warning: {steps}: rank {slowest} is the slowest, forward "
                f"{forward[slowest]:.3f} s per step, {forward[slowest] / median:.2f}x the median "
                f"rank's {median:.3f} s"
            )
