"""Save a checkpoint every `checkpoint.interval` steps, at the end, and before any stop; an
asynchronous save is completed at a later read of the step numbers or at the end."""

from __future__ import annotations

from lws_megatron.training import hangs
from lws_megatron.training.callbacks.base import Callback, registered


@registered("checkpointing", default=True)
class Checkpointing(Callback):
    priority = 90  # last: the others decide whether the run stops after this step

    def on_train_start(self, trainer) -> None:
        self.last_saved = trainer.resumed_step

    def on_interval_end(self, trainer, interval) -> None:
        _report(trainer, trainer.checkpointer.poll())
        every = trainer.config.checkpoint.interval
        due = every and trainer.step % every == 0
        final = trainer.step == trainer.config.train.max_steps
        if not (due or final or trainer.stopping) or self.last_saved == trainer.step:
            return
        with hangs.patient(trainer.config.run.collective_timeout_s):
            done = trainer.checkpointer.save(
                trainer.module, trainer.step, {"skipped_steps": trainer.skipped_steps}
            )
        self.last_saved = trainer.step
        _report(trainer, done)

    def on_train_end(self, trainer) -> None:
        with hangs.patient(trainer.config.run.collective_timeout_s):
            _report(trainer, trainer.checkpointer.wait())


def _report(trainer, paths) -> None:
    for path in paths:
        trainer.say(f"saved checkpoint {path}")
