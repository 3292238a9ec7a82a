"""SIGTERM, SIGUSR1 (SLURM's warning before pre-emption) or SIGINT asks for a checkpoint and
exit, whichever process got it: one rank, or every process of the job at once (`kill -- -PGID`,
`timeout`, SLURM's step kill; the loader workers ignore it).

The signal only sets a flag; the trainer sends it with the next step's token count (one
all-reduce on the device) and every rank reads the count at the end of that step
(`step_stats.StopRequests`), so all of them stop after the same step: a signal that came by
step N (during it, or before) ends the run with the checkpoint of step N + 1.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

from lws_megatron.training.callbacks.base import Callback, registered
from lws_megatron.training.loader import STOP_SIGNALS

if TYPE_CHECKING:
    from lws_megatron.training.trainer import Trainer


@registered("preemption", default=True)
class Preemption(Callback):
    priority = 30

    def __init__(self) -> None:
        self.received: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def before_step(self, trainer: Trainer) -> None:
        if self.received:
            to = f"{self.received} to rank {trainer.rank} by step {trainer.step}"
            trainer.ask_to_stop(f"pre-emption signal ({to})")
