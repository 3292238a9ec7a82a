"""Stop (after a checkpoint) when too many steps in a row had a non-finite loss or gradient."""

from __future__ import annotations

import math

from lws_megatron.training.callbacks.base import Callback, registered


@registered("nonfinite_stop", default=True)
class NonFiniteStop(Callback):
    priority = 30

    def __init__(self) -> None:
        self.in_a_row = 0

    def on_step_end(self, trainer, result, seconds) -> None:
        bad = result.skipped or not math.isfinite(result.loss)
        self.in_a_row = self.in_a_row + 1 if bad else 0
        if self.in_a_row >= trainer.config.train.max_nonfinite_steps:
            trainer.request_stop(
                f"{self.in_a_row} steps in a row had a non-finite loss or gradient (step "
                f"{trainer.step}); a checkpoint was saved. Lower optim.lr, raise "
                "optim.warmup_steps or check the data, then resume",
                error=True,
            )
