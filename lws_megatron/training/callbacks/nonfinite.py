"""Stop (after a checkpoint) when too many steps in a row had a non-finite loss or gradient.

Such steps are skipped on the device; the run is counted there too and seen at the next read
(`Trainer.read_due`), so the stop comes at most one log interval after the limit is reached."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lws_megatron.errors import UserError
from lws_megatron.training.callbacks.base import Callback, registered

if TYPE_CHECKING:
    from lws_megatron.training.step_stats import Interval
    from lws_megatron.training.trainer import Trainer


@registered("nonfinite_stop", default=True)
class NonFiniteStop(Callback):
    priority = 30

    def on_interval_end(self, trainer: Trainer, interval: Interval) -> None:
        run = interval.nonfinite_run
        if run >= trainer.config.train.max_nonfinite_steps:
            trainer.request_stop(
                f"{run} steps in a row had a non-finite loss or gradient (by step "
                f"{trainer.step}); a checkpoint was saved. Lower optim.lr, raise "
                "optim.warmup_steps or check the data, then resume",
                error=UserError,
            )
