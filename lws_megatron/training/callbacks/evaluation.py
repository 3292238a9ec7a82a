"""Validation loss before the first step, every `eval.interval` steps and at the end."""

from __future__ import annotations

import math

from lws_megatron.training.callbacks.base import Callback, registered


@registered("evaluation", default=True)
class Evaluation(Callback):
    priority = 20

    def on_train_start(self, trainer) -> None:
        if trainer.step == 0 and trainer.config.eval.interval and trainer.valid_batches:
            self._evaluate(trainer)

    def on_interval_end(self, trainer, interval) -> None:
        every = trainer.config.eval.interval
        if not (every and trainer.valid_batches):
            return
        if trainer.step % every and trainer.step != trainer.config.train.max_steps:
            return
        self._evaluate(trainer)

    def _evaluate(self, trainer) -> None:
        loss = trainer.module.eval_batch(trainer.valid_batches)
        trainer.last_val_loss = loss
        trainer.writer.log(
            {
                "step": trainer.step,
                "tokens": trainer.step * trainer.tokens_per_step,
                "val_loss": loss,
                "val_ppl": math.exp(min(loss, 50.0)),
            }
        )
