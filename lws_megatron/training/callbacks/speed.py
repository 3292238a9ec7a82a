"""The step metrics (loss, gradient norm, any recorded by name), learning rate, tokens/s and
MFU, over each log interval; the peak memory of the rank that used the most (under PP not rank
0's), and the slowest rank's time in forward passes against the median rank's (the step time
is the slowest rank's on every rank, so it names none; `step_stats.ForwardClock` says why the
forward); the host's load average beside them, so that a report can tell a shared machine's
figures."""

from __future__ import annotations

import os
import statistics
from typing import TYPE_CHECKING

from lws_megatron.training.callbacks.base import Callback, registered

if TYPE_CHECKING:
    from lws_megatron.training.step_stats import Interval
    from lws_megatron.training.trainer import Trainer


@registered("speed_monitor", default=True)
class SpeedMonitor(Callback):
    priority = 10

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.steps, self.seconds = 0, 0.0
        self.rank_forward: list[float] = []

    def on_interval_end(self, trainer: Trainer, interval: Interval) -> None:
        """Reads between log steps (evaluation, checkpoints) add up to one logged record; the
        metrics already span the log interval (`StepStats.read`)."""
        self.steps += interval.steps
        self.seconds += interval.seconds
        forward = interval.rank_forward_s
        self.rank_forward = [
            a + b for a, b in zip(self.rank_forward or [0.0] * len(forward), forward)
        ]
        if not interval.due.log:
            return
        tokens_per_s = trainer.tokens_per_step * self.steps / self.seconds
        peak = trainer.peak_flops * trainer.plan.world
        trainer.writer.log(
            {
                "step": trainer.step,
                "tokens": trainer.step * trainer.tokens_per_step,
                **interval.metrics,
                "lr": trainer.lr,
                "tokens_per_s": tokens_per_s,
                "tokens_per_s_per_device": tokens_per_s / trainer.plan.world,
                "mfu": tokens_per_s * trainer.flops_per_token / peak if peak else 0.0,
                "step_time_s": self.seconds / self.steps,
                **_ranks(interval.rank_mem_gb, [s / self.steps for s in self.rank_forward]),
                "skipped_steps": trainer.skipped_steps,
                "load_avg": os.getloadavg()[0],
            }
        )
        self._reset()


def _ranks(mem_gb, forward_s) -> dict:
    """The rank with the most memory, and the slowest rank's forward time per step against
    the median rank's."""
    mem_rank = max(range(len(mem_gb)), key=mem_gb.__getitem__)
    slowest = max(range(len(forward_s)), key=forward_s.__getitem__)
    return {
        "mem_gb": mem_gb[mem_rank],
        "mem_rank": mem_rank,
        "slowest_rank": slowest,
        "slowest_rank_forward_s": forward_s[slowest],
        "median_rank_forward_s": statistics.median(forward_s),
    }
