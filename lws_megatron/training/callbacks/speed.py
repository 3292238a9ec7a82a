"""Loss, learning rate, gradient norm, tokens/s and MFU, averaged over each log interval."""

from __future__ import annotations

from lws_megatron.training.callbacks.base import Callback, registered
from lws_megatron.training.metrics import memory_gb


@registered("speed_monitor", default=True)
class SpeedMonitor(Callback):
    priority = 10

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.losses: list[float] = []
        self.times: list[float] = []

    def on_step_end(self, trainer, result, seconds) -> None:
        if not result.skipped:
            self.losses.append(result.loss)
        self.times.append(seconds)
        t = trainer.config.train
        if trainer.step % t.log_interval and trainer.step != t.max_steps:
            return
        tokens_per_s = trainer.tokens_per_step * len(self.times) / sum(self.times)
        peak = trainer.peak_flops * trainer.plan.world
        trainer.writer.log(
            {
                "step": trainer.step,
                "tokens": trainer.step * trainer.tokens_per_step,
                "loss": sum(self.losses) / len(self.losses) if self.losses else float("nan"),
                "lr": trainer.lr,
                "grad_norm": result.grad_norm,
                "tokens_per_s": tokens_per_s,
                "tokens_per_s_per_device": tokens_per_s / trainer.plan.world,
                "mfu": tokens_per_s * trainer.flops_per_token / peak if peak else 0.0,
                "step_time_s": sum(self.times) / len(self.times),
                "mem_gb": memory_gb(trainer.device),
                "skipped_steps": trainer.skipped_steps,
            }
        )
        self._reset()
