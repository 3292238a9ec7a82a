"""Run metrics: a console line per interval (step of total, ETA), `metrics.jsonl`, TensorBoard
(tags grouped train/, val/, perf/, the resolved config as hyperparameters), and any sinks a
callback adds (wandb), all with the names of `metrics.jsonl`."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from lws_megatron.cli import duration
from lws_megatron.training.run_dir import trim_metrics

PERF_KEYS = ("tokens_per_s", "tokens_per_s_per_device", "mfu", "step_time_s", "mem_gb", "load_avg")


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def tensorboard_tag(key: str) -> str:
    """`val_loss` -> val/loss, `mfu` -> perf/mfu, `loss` -> train/loss."""
    if key.startswith("val_"):
        return "val/" + key[4:]
    return ("perf/" if key in PERF_KEYS else "train/") + key


def flat_hparams(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as TensorBoard's hyperparameters: dotted keys, lists as text."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{prefix}{key}."))
        else:
            simple = isinstance(value, (bool, int, float, str))
            out[prefix + key] = value if simple else json.dumps(value)
    return out


class MetricsWriter:
    """Written by global rank 0 only; every line is flushed so a killed run keeps its history."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        tensorboard: bool = True,
        purge_after: int = 0,
        max_steps: int | None = None,
        hparams: dict[str, Any] | None = None,
    ):
        """`purge_after`: the step a run resumed at; records of later steps (logged by the run
        before it stopped) are dropped, since this run logs them again. `max_steps`: the
        total the console lines count to; `hparams`: the resolved config, for TensorBoard."""
        self.enabled = enabled
        self.start = time.time()
        self.max_steps = max_steps
        self.sinks: list[Callable[[dict[str, Any]], None]] = []
        self._eta_from: tuple[float, int] | None = None
        self._file = None
        self._tb = None
        if enabled:
            trim_metrics(run_dir, purge_after)
            self._file = open(run_dir / "metrics.jsonl", "a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(
                    str(run_dir / "tensorboard"),
                    purge_step=purge_after + 1 if purge_after else None,
                )
                if hparams:
                    self._write_hparams(hparams)

    def _write_hparams(self, hparams: dict[str, Any]) -> None:
        """The HParams tab's entry for this run, beside its scalars (not in a run of its own,
        as `SummaryWriter.add_hparams` would make it)."""
        from torch.utils.tensorboard.summary import hparams as summary

        metrics = {"val/loss": None, "train/loss": None}
        for part in summary(flat_hparams(hparams), metrics):
            self._tb.file_writer.add_summary(part)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {**record, "time_s": round(time.time() - self.start, 3)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time_s") and isinstance(value, (int, float)):
                    self._tb.add_scalar(tensorboard_tag(key), value, record["step"])
            self._tb.flush()
        for sink in self.sinks:
            sink(record)
        print(self._console_line(record), file=sys.stdout, flush=True)

    def eta_seconds(self, step: int, step_time_s: float) -> float | None:
        """Time left to `max_steps`: the wall clock per step since the first logged interval
        (evaluation and checkpoints included), or that interval's step time at first."""
        if self.max_steps is None:
            return None
        now, left = time.time(), self.max_steps - step
        if self._eta_from is None or step <= self._eta_from[1]:
            self._eta_from = (now, step)
            return step_time_s * left
        began, first = self._eta_from
        return (now - began) / (step - first) * left

    def _console_line(self, r: dict[str, Any]) -> str:
        total = f"/{self.max_steps}" if self.max_steps is not None else ""
        step = f"step {r['step']:>6}{total}"
        if "val_loss" in r:
            return f"{step} | validation loss {r['val_loss']:.4f} | ppl {r['val_ppl']:.2f}"
        eta = self.eta_seconds(r["step"], r["step_time_s"])
        return (
            f"{step} | loss {r['loss']:.4f} | lr {r['lr']:.3e} | grad norm "
            f"{r['grad_norm']:.3f} | {r['tokens_per_s']:,.0f} tok/s "
            f"({r['tokens_per_s_per_device']:,.0f} per device) | MFU {100 * r['mfu']:.1f}% | "
            f"{r['step_time_s'] * 1000:.0f} ms/step | mem {r['mem_gb']:.2f} GB"
            + (f" | skipped {r['skipped_steps']}" if r.get("skipped_steps") else "")
            + (f" | ETA {duration(eta)}" if eta is not None else "")
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
