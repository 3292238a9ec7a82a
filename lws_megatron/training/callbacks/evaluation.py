"""Validation loss every `eval.interval` steps and at the end of training."""

from __future__ import annotations

import math

from lws_megatron.training.callbacks.base import Callback, registered


@registered("evaluation", default=True)
class Evaluation(Callback):
    priority = 20

    def on_step_end(self, trainer, result, seconds) -> None:
        interval = trainer.config.eval.interval
        if not (interval and trainer.valid_batches):
            return
        if trainer.step % interval and trainer.step != trainer.config.train.max_steps:
            return
        loss = trainer.module.eval_batch(trainer.valid_batches)
        trainer.last_val_loss = loss
        trainer.writer.log({"step": trainer.step,
                            "tokens": trainer.step * trainer.tokens_per_step,
                            "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))})
