"""SIGTERM or SIGUSR1 (SLURM's warning before pre-emption) asks for a checkpoint and exit.

The signal only sets a flag; it travels with the next step's token count (one all-reduce on
the device) and is seen at the next read of the step numbers (`Trainer.read_due`: at most one
log interval later), so every rank stops after the same step, whichever rank got the signal.
"""

from __future__ import annotations

import signal

from lws_megatron.training.callbacks.base import Callback, registered


@registered("preemption", default=True)
class Preemption(Callback):
    priority = 30

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def before_step(self, trainer) -> None:
        trainer.stop_signal = trainer.stop_signal or self.requested

    def on_interval_end(self, trainer, interval) -> None:
        if interval.stop_requested:
            trainer.request_stop(
                f"pre-emption signal: checkpointed at step {trainer.step}, exiting"
            )
