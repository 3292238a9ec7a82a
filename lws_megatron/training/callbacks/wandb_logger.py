"""Weights & Biases: every record of `metrics.jsonl`, under its names, to a wandb run whose config
is the run's resolved config. Optional: `train.callbacks: [wandb]` and the `wandb` extra.

wandb's own environment variables choose where it goes, as in Hugging Face's `report_to`:
`WANDB_MODE=offline` writes the run under `run.dir/wandb/` without a network (`wandb sync`
uploads it later), `WANDB_PROJECT` (default lws-megatron), `WANDB_ENTITY`. The wandb run's id
is kept in `run.dir/wandb_id`, so a resumed run goes on logging into the same wandb run. Only
global rank 0 talks to wandb; a wandb that cannot start stops every rank in one line.
"""

from __future__ import annotations

import os
import secrets
from typing import TYPE_CHECKING

from lws_megatron.errors import UserError
from lws_megatron.fileio import write_text_atomic
from lws_megatron.training import distributed
from lws_megatron.training.callbacks.base import Callback, registered

if TYPE_CHECKING:
    from lws_megatron.training.trainer import Trainer


@registered("wandb")
class WandbLogger(Callback):
    priority = 0  # first: listening before the step-0 evaluation logs

    def __init__(self) -> None:
        try:
            import wandb
        except ImportError:
            raise UserError(
                "train.callbacks: wandb needs the wandb package; install the extra "
                "(pip install -e '.[wandb]') or drop wandb from train.callbacks"
            ) from None
        self.wandb = wandb
        self.run = None

    def on_train_start(self, trainer: Trainer) -> None:
        distributed.agreed(lambda: self._start(trainer) if trainer.rank == 0 else None)

    def _start(self, trainer: Trainer) -> None:
        id_file = trainer.run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(8)
        try:
            self.run = self.wandb.init(
                project=os.environ.get("WANDB_PROJECT", "lws-megatron"),
                name=trainer.config.run.name or trainer.run_dir.name,
                id=run_id,
                resume="allow",
                dir=str(trainer.run_dir),
                config=trainer.config.to_dict(),
            )
        except Exception as err:  # noqa: BLE001 - wandb raises its own kinds (network, login)
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else repr(err)
            raise UserError(
                f"wandb could not start ({reason}); set WANDB_MODE=offline to log without "
                "a network, or drop wandb from train.callbacks"
            ) from None
        write_text_atomic(id_file, run_id + "\n")
        trainer.writer.sinks.append(self._log)

    def _log(self, record: dict) -> None:
        values = {k: v for k, v in record.items() if k != "step"}
        self.run.log(values, step=record["step"])

    def on_train_end(self, trainer: Trainer) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
