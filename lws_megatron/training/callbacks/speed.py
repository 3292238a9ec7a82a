"""Loss, learning rate, gradient norm, tokens/s and MFU, over each log interval; the host's load
average beside them, so that a report can tell a shared machine's figures."""

from __future__ import annotations

import os

from lws_megatron.training.callbacks.base import Callback, registered
from lws_megatron.training.metrics import memory_gb


@registered("speed_monitor", default=True)
class SpeedMonitor(Callback):
    priority = 10

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.loss_sum, self.applied, self.steps, self.seconds = 0.0, 0, 0, 0.0

    def on_interval_end(self, trainer, interval) -> None:
        """Reads between log steps (evaluation, checkpoints) add up to one logged record."""
        if interval.applied:
            self.loss_sum += interval.loss * interval.applied
            self.applied += interval.applied
        self.steps += interval.steps
        self.seconds += interval.seconds
        t = trainer.config.train
        if trainer.step % t.log_interval and trainer.step != t.max_steps:
            return
        tokens_per_s = trainer.tokens_per_step * self.steps / self.seconds
        peak = trainer.peak_flops * trainer.plan.world
        trainer.writer.log(
            {
                "step": trainer.step,
                "tokens": trainer.step * trainer.tokens_per_step,
                "loss": self.loss_sum / self.applied if self.applied else float("nan"),
                "lr": trainer.lr,
                "grad_norm": interval.grad_norm,
                "tokens_per_s": tokens_per_s,
                "tokens_per_s_per_device": tokens_per_s / trainer.plan.world,
                "mfu": tokens_per_s * trainer.flops_per_token / peak if peak else 0.0,
                "step_time_s": self.seconds / self.steps,
                "mem_gb": memory_gb(trainer.device),
                "skipped_steps": trainer.skipped_steps,
                "load_avg": os.getloadavg()[0],
            }
        )
        self._reset()
