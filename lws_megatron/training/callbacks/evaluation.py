"""Validation loss before the first step, every `eval.interval` steps and at the end."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lws_megatron.training.callbacks.base import Callback, registered

if TYPE_CHECKING:
    from lws_megatron.training.step_stats import Interval
    from lws_megatron.training.trainer import Trainer


@registered("evaluation", default=True)
class Evaluation(Callback):
    priority = 20

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.step == 0 and trainer.config.eval.interval and trainer.valid_batches:
            self._evaluate(trainer)

    def on_interval_end(self, trainer: Trainer, interval: Interval) -> None:
        if interval.due.eval and trainer.valid_batches:
            self._evaluate(trainer)

    def _evaluate(self, trainer: Trainer) -> None:
        """Logged as its own record; the summary's final validation loss is the last step's."""
        loss = trainer.module.eval_batch(trainer.valid_batches)
        trainer.writer.log(
            {
                "step": trainer.step,
                "tokens": trainer.step * trainer.tokens_per_step,
                "val_loss": loss,
                "val_ppl": math.exp(min(loss, 50.0)),
            }
        )
