"""The pre-training run: set up processes, data and the train module, then loop over steps.

Everything the run writes lives in `run.dir`: the resolved `config.yaml`, `run_info.json`,
`metrics.jsonl`, TensorBoard events, `checkpoints/` and, when it ends, `summary.json`. The loop
itself only steps, works out once per step what the step is due for (`schedule.due`) and reads
the device at those steps; metrics, evaluation, checkpoints and stops are callbacks
(`lws_megatron.training.callbacks`), handed what was read and what is due.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from lws_megatron.config import Config, block_fingerprint, dump_config
from lws_megatron.dataset.manifest import split_prefix
from lws_megatron.device import host_values, on_host
from lws_megatron.errors import JobFailure, UserError
from lws_megatron.fileio import ensure_dir, os_errors, write_json_atomic, write_text_atomic
from lws_megatron.model.compile import compile_stats
from lws_megatron.training import data, distributed, hangs, provenance, schedule
from lws_megatron.training.callbacks import build_callbacks
from lws_megatron.training.checkpoint import Checkpointer
from lws_megatron.training.data_passes import passes_warning
from lws_megatron.training.data_verify import verify_sources
from lws_megatron.training.documents import DocumentBatches
from lws_megatron.training.loader import StepLoader
from lws_megatron.training.metrics import MetricsWriter, memory_gb
from lws_megatron.training.peak_flops import device_peak_flops
from lws_megatron.training.run_dir import RunLock, clear_records, refuse_foreign_records
from lws_megatron.training.step_stats import Interval, Reduce, StepStats
from lws_megatron.training.train_module import TrainModule

READ_EVERY_S = 10.0  # the longest the host goes without reading the steps' numbers


def train(config: Config) -> dict[str, Any] | None:
    """Train to `train.max_steps` (or a pre-emption signal). Returns the summary on rank 0."""
    callbacks = build_callbacks(config.train.callbacks)  # signal handlers before the slow setup
    timeout = hangs.setup_timeout(config.run.collective_timeout_s)
    if torch.cuda.is_available():
        hangs.flight_recorder(Path(config.run.dir))
    device = distributed.init_processes(timeout)
    plan = distributed.agreed(lambda: distributed.resolve_plan(config, dist.get_world_size()))
    distributed.initialize_model_parallel(plan, config.train.seed, timeout)
    trainer = None
    try:
        trainer = Trainer(config, plan, device, callbacks)
        return trainer.fit()
    except RuntimeError as err:
        if not hangs.is_peer_lost(err):
            raise
        where = f"after step {trainer.step}" if trainer else "setup"
        raise hangs.peer_failure(err, where, config.run.collective_timeout_s) from None
    finally:
        distributed.destroy_model_parallel()


def fingerprint(config: Config, sources: data.Sources) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the model's shapes, the data (its files, blend
    and order, by the seed) and the global batch, which counts the data position. TP, PP, the
    layout, DP, ZeRO and the micro batch may all differ."""
    m = config.model
    return {
        "model.layers": [list(vars(s).values()) for s in config.summary().layers],
        "model.d_model": m.d_model,
        "model.d_head": m.d_head,
        "model.vocab_size": m.vocab_size,
        "model.seq_length": m.seq_length,
        "model.tie_embeddings": m.tie_embeddings,
        **{f"model.{k}": v for k, v in block_fingerprint(m).items()},
        "data.files_sha256": sources.data_hashes,
        "data.weights": sources.weights,
        "data.tokenizer_sha256": sources.tokenizer.fingerprint,
        "train.seed": config.train.seed,
        "train.global_batch_size": config.train.global_batch_size,
    }


def saving_layout(config: Config, plan: distributed.ParallelPlan) -> dict[str, Any]:
    """How the ranks split the state (recorded, not checked: any of it may change)."""
    return {
        "world": plan.world,
        "tp": plan.tp,
        "pp": plan.pp,
        "dp": plan.dp,
        "pipeline_layout": plan.layout,
        "zero_stage": config.zero.stage,
        "micro_batch_size": plan.micro_batch_size,
    }


class Trainer:
    """The loop's state (step, counters, stop), what callbacks read, and the run's records."""

    def __init__(
        self, config: Config, plan: distributed.ParallelPlan, device: torch.device, callbacks: list
    ) -> None:
        self.config, self.plan, self.device, self.callbacks = config, plan, device, callbacks
        self.rank = dist.get_rank()
        self.host_group = distributed.host_group()
        self.run_dir = Path(config.run.dir)
        self.data_cache = self.run_dir / "data_cache"
        self.lock = RunLock(self.run_dir)
        note = distributed.agreed(lambda: self.lock.acquire() if self.rank == 0 else None)
        if note:
            self.say(note)
        try:
            self._setup(config, plan, device)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, config: Config, plan: distributed.ParallelPlan, device: torch.device) -> None:
        summary = config.summary()
        self.flops_per_token, self.total_params = summary.flops_per_token, summary.total_params
        self.tokens_per_step = plan.global_batch_size * config.model.seq_length
        self.peak_flops, self.peak_source = device_peak_flops(device)
        self.sources = distributed.agreed(lambda: data.resolve_sources(config, verify=False))
        verify_sources(config, self.sources.prefixes, self.sources.tokenizer, self.data_cache)
        warning = passes_warning(config, self.sources.prefixes, self.sources.weights)
        if warning:
            self.say(warning)
        self.module = TrainModule(config, plan, device)
        self.module.compile()
        self.train_ds, valid_ds = data.build_datasets(config, self.sources, self.data_cache)
        self.valid_batches = self._validation_batches(valid_ds)
        c = config.checkpoint
        self.checkpointer = Checkpointer(
            self.run_dir,
            c.keep,
            fingerprint(config, self.sources),
            saving_layout(config, plan),
            async_save=device.type == "cuda" if c.async_save is None else c.async_save,
        )
        if self.rank == 0:
            self.checkpointer.remove_partial()
        self.step = self.resumed_step = self.skipped_steps = 0
        self.lr = 0.0
        self.due = schedule.Due()  # what the step just done is due for
        self.stats = StepStats(device)
        self.local_stop: tuple[str, type[Exception] | None] | None = None  # why this rank asks
        self.stop_reason: str | None = None
        self.stop_error: type[Exception] | None = None
        self._resume()
        self._write_records()
        self.writer = MetricsWriter(
            self.run_dir,
            enabled=self.rank == 0,
            purge_after=self.resumed_step,
            max_steps=config.train.max_steps,
            hparams=config.to_dict(),
        )

    def _validation_batches(self, valid_ds):
        """This rank's share of the validation set, for `eval.mode`."""
        if valid_ds is None or self.config.eval.mode == "packed":
            return data.validation_batches(self.config, valid_ds, self.plan)
        pad = self.sources.tokenizer.pad
        return DocumentBatches(
            [split_prefix(p, "valid") for p in self.sources.prefixes],
            self.config.model.seq_length,
            self.plan.micro_batch_size,
            ps.get_data_parallel_rank(),
            self.plan.dp,
            pad if pad is not None else 0,
        )

    def read_due(self) -> bool:
        """Whether the host reads the steps' numbers now: wherever the step is due for
        something (a log line, evaluation, a checkpoint, the last step), and at least every
        `READ_EVERY_S` seconds, so that a run of non-finite steps is seen in time whatever
        `train.log_interval` is, and at a stop; never in between."""
        return self.due.anything or self.stopping or self.step >= self.next_read

    def record_metric(self, name: str, value: torch.Tensor, reduce: Reduce = "mean") -> None:
        """A number of the current step, logged under `name` at the log steps; it stays on the
        device until the next read takes it with the rest (`StepStats.record`)."""
        self.stats.record(name, value, reduce)

    def _read(self, began: float) -> Interval:
        """The interval's numbers, and the next read planned: spaced by the slowest rank's
        step time of the interval before (read in the same transfer), so that every rank reads
        at the same steps (a read can lead to a collective: a checkpoint, a stop)."""
        slowest = host_values([self.step_seconds], self.device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        interval = self._with_ranks(self.stats.read(began, slowest, log=self.due.log))
        self.step_seconds = interval.step_seconds
        spacing = int(READ_EVERY_S / max(interval.slowest_prior_step_s, 1e-9))
        self.next_read = self.step + max(1, min(self.config.train.log_interval, spacing))
        return interval

    def _with_ranks(self, interval: Interval) -> Interval:
        """What the step is due for, and every rank's time in forward passes and peak memory
        over the interval, gathered on the host once the interval's numbers are read (so the
        device has done its steps)."""
        numbers: list = [None] * dist.get_world_size()
        mine = (self.module.clock.seconds(), memory_gb(self.device))
        with on_host():
            dist.all_gather_object(numbers, mine, group=self.host_group)
        return dataclasses.replace(
            interval,
            due=self.due,
            rank_forward_s=tuple(n[0] for n in numbers),
            rank_mem_gb=tuple(n[1] for n in numbers),
        )

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None

    def request_stop(self, reason: str, error: type[Exception] | None = None) -> None:
        """End the run after this step, every rank alike (a checkpoint is saved first);
        `error`: raise it with `reason` (UserError: exit 2; JobFailure: exit 1)."""
        self.stop_reason = self.stop_reason or reason
        self.stop_error = self.stop_error or error

    def ask_to_stop(self, reason: str, error: type[Exception] | None = None) -> None:
        """This rank asks the run to stop: the request goes with the next step to every rank,
        and all stop after it. An error's reason replaces a signal's."""
        if self.local_stop is None or (error and not self.local_stop[1]):
            self.local_stop = (reason, error)

    def _agree_on_stop(self) -> None:
        """Some rank asked at the step just done: every rank learns why (once, on the host)."""
        asked: list = [None] * dist.get_world_size()
        dist.all_gather_object(asked, self.local_stop)
        asked = [a for a in asked if a]
        reason, error = next((a for a in asked if a[1]), asked[0])
        if error:
            self.request_stop(
                f"{reason}; checkpointed at step {self.step}, exiting: start the run again to "
                "resume from there",
                error,
            )
        else:
            self.request_stop(f"{reason}: checkpointed at step {self.step}, exiting")

    def say(self, line: str) -> None:
        if self.rank == 0:
            print(line, flush=True)

    def fit(self) -> dict[str, Any] | None:
        try:
            return self._fit()
        finally:
            self.lock.release()

    def _fit(self) -> dict[str, Any] | None:
        if self.resumed_step == self.config.train.max_steps:
            done = self.run_dir / "summary.json"
            return json.loads(done.read_text()) if self.rank == 0 and done.is_file() else None
        started = time.time()
        for callback in self.callbacks:
            callback.on_train_start(self)
        t = self.config.train
        steps = StepLoader(
            self.train_ds,
            self.plan,
            ps.get_data_parallel_rank(),
            self.step,
            t.max_steps,
            self.config.data.num_workers,
            self.device,
        )
        self.next_read = self.step + 1  # then spaced by the step time (`_read`)
        self.step_seconds = math.inf  # of the last interval, on this rank
        interval_began = time.perf_counter()
        try:
            while self.step < t.max_steps and not self.stopping:
                self._step(steps)
                if self.read_due():
                    interval = self._read(interval_began)
                    self.skipped_steps += interval.skipped
                    for callback in self.callbacks:
                        callback.on_interval_end(self, interval)
                    interval_began = time.perf_counter()
        finally:
            steps.close()
        for callback in self.callbacks:
            callback.on_train_end(self)
        self.writer.close()
        if self.stop_error:
            raise self.stop_error(self.stop_reason)
        if self.stopping:
            self.say(self.stop_reason)
            return None
        return self._write_summary(time.time() - started) if self.rank == 0 else None

    def _step(self, steps: StepLoader) -> None:
        """One optimizer step queued, and what it is due for; then whether some rank asked to
        stop at it."""
        for callback in self.callbacks:
            callback.before_step(self)
        t = self.config.train
        self.lr = schedule.learning_rate(self.step, self.config.optim, t.max_steps)
        self.module.set_lr(self.lr)
        step = next(steps)
        if steps.lost:
            self.ask_to_stop(f"rank {self.rank}: {steps.lost}", JobFailure)
        asking = self.local_stop is not None
        self.stats.add(self.module.train_batch(step.batches, step.loss_tokens, asking))
        self.step += 1
        self.due = schedule.due(self.step, self.config)
        if self.step == self.resumed_step + 1:  # compiled and warm: the collective timeout holds
            hangs.set_timeout(self.config.run.collective_timeout_s)
        if self.module.stop_requests.any():
            self._agree_on_stop()

    def _resume(self) -> None:
        """Continue from the newest intact checkpoint; never start over another run's records."""
        resume, config = self.config.checkpoint.resume, self.config.to_dict()
        distributed.agreed(
            lambda: refuse_foreign_records(
                self.run_dir, resume, bool(self.checkpointer.complete()), config
            )
        )
        state = self.checkpointer.resume(self.module) if resume else None
        if state is None:
            if distributed.agreed(
                lambda: refuse_foreign_records(self.run_dir, resume, False, config)
            ):
                if self.rank == 0:
                    clear_records(self.run_dir)
                self.say(
                    f"note: {self.run_dir} holds the records of this run, which ended before its "
                    "first checkpoint: it starts again from step 0 and replaces them"
                )
            return
        self.step = self.resumed_step = state["step"]
        self.skipped_steps = state["skipped_steps"]
        max_steps = self.config.train.max_steps
        if self.step > max_steps:
            raise UserError(
                f"{self.run_dir} resumed at step {self.step}, past train.max_steps={max_steps}; "
                f"set train.max_steps above {self.step} to train on"
            )
        saved, now = state["layout"], saving_layout(self.config, self.plan)
        moved = "" if saved == now else f" (saved at {_describe(saved)}, now {_describe(now)})"
        self.say(
            f"resumed from {state['path']} at step {self.step}{moved}"
            + (": the run is already complete" if self.step == max_steps else "")
        )

    def _write_records(self) -> None:
        world = provenance.world(distributed.launcher(), self.host_group)
        if self.rank != 0:
            return
        ensure_dir(self.run_dir)
        device = self.device
        with os_errors(self.run_dir):
            write_text_atomic(self.run_dir / "config.yaml", dump_config(self.config))
            write_json_atomic(
                self.run_dir / "run_info.json",
                {
                    "name": self.config.run.name or self.run_dir.name,
                    "total_params": self.total_params,
                    "flops_per_token": self.flops_per_token,
                    "tokenizer_sha256": self.sources.tokenizer.fingerprint,
                    "valid_data": [f"{p}_valid" for p in self.sources.prefixes],
                    "valid_data_sha256": self.sources.valid_fingerprint,
                    "world_size": self.plan.world,
                    "tp": self.plan.tp,
                    "pp": self.plan.pp,
                    "dp": self.plan.dp,
                    "zero_stage": self.config.zero.stage,
                    "pipeline_layout": self.plan.layout,
                    "device": torch.cuda.get_device_name(device)
                    if device.type == "cuda"
                    else "cpu",
                    "precision": self.module.precision.name,
                    "peak_flops": self.peak_flops,
                    "peak_flops_source": self.peak_source,
                    "host_cpus": os.cpu_count(),
                    "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "git": provenance.git_commit(),
                    "versions": provenance.versions(),
                    "launch": world,
                },
            )

    def _write_summary(self, wall: float) -> dict[str, Any]:
        final = run_summary(self.run_dir / "metrics.jsonl", self.step, self.tokens_per_step, wall)
        if self.config.train.compile != "none":
            final.update(compile_stats())
            if final["graph_breaks"]:
                self.say(
                    f"train.compile={self.config.train.compile}: {final['graph_breaks']} "
                    "graph break(s) on rank 0 (each splits the compiled region); "
                    "TORCH_LOGS=graph_breaks shows where"
                )
        write_json_atomic(self.run_dir / "summary.json", final)
        return final


def _describe(layout: dict[str, Any]) -> str:
    split = f"TP={layout['tp']} x PP={layout['pp']} x DP={layout['dp']}"
    return f"{split}, ZeRO {layout['zero_stage']}, layout {layout['pipeline_layout'] or 'even'}"


def run_summary(metrics: Path, steps: int, tokens_per_step: int, wall: float) -> dict[str, Any]:
    """The run's closing numbers; speed averages the logged intervals after the first, and the
    validation loss is the last step's (none when evaluation is off)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train_records = [r for r in records if "loss" in r]
    later = train_records[1:] or train_records
    val_loss = next(
        (r["val_loss"] for r in records if "val_loss" in r and r["step"] == steps), None
    )
    return {
        "wall_time_s": round(wall, 3),
        "steps": steps,
        "tokens": steps * tokens_per_step,
        "final_loss": train_records[-1]["loss"] if train_records else None,
        "final_val_loss": val_loss,
        "final_val_ppl": math.exp(min(val_loss, 50.0)) if val_loss is not None else None,
        "tokens_per_s": sum(r["tokens_per_s"] for r in later) / len(later) if later else None,
        "mfu": sum(r["mfu"] for r in later) / len(later) if later else None,
    }
