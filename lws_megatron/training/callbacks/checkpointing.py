"""Save a checkpoint every `checkpoint.interval` steps, at the end, and before any stop; an
asynchronous save is completed at a later read of the step numbers or at the end."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lws_megatron.training import hangs
from lws_megatron.training.callbacks.base import Callback, registered

if TYPE_CHECKING:
    from lws_megatron.training.step_stats import Interval
    from lws_megatron.training.trainer import Trainer


@registered("checkpointing", default=True)
class Checkpointing(Callback):
    priority = 90  # last: the others decide whether the run stops after this step

    def on_train_start(self, trainer: Trainer) -> None:
        self.last_saved = trainer.resumed_step

    def on_interval_end(self, trainer: Trainer, interval: Interval) -> None:
        _report(trainer, trainer.checkpointer.poll())
        if not (interval.due.checkpoint or trainer.stopping) or self.last_saved == trainer.step:
            return
        with hangs.patient(trainer.config.run.collective_timeout_s):
            done = trainer.checkpointer.save(
                trainer.module, trainer.step, {"skipped_steps": trainer.skipped_steps}
            )
        self.last_saved = trainer.step
        _report(trainer, done)

    def on_train_end(self, trainer: Trainer) -> None:
        with hangs.patient(trainer.config.run.collective_timeout_s):
            _report(trainer, trainer.checkpointer.wait())


def _report(trainer: Trainer, paths: list[Path]) -> None:
    for path in paths:
        trainer.say(f"saved checkpoint {path}")
