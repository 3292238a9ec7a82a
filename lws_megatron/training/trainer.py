"""The pre-training run: set up processes, data, model and ZeRO engine, then loop over steps.

Everything the run writes lives in `run.dir`: the resolved `config.yaml`, `run_info.json`,
`metrics.jsonl`, TensorBoard events, `checkpoints/` and, when it ends, `summary.json`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from lws_megatron.config import Config, block_fingerprint, dump_config
from lws_megatron.errors import UserError
from lws_megatron.training import launch_env
from lws_megatron.training.metrics import MetricsWriter, device_peak_flops, memory_gb

T = TypeVar("T")


class Preemption:
    """SIGTERM or SIGUSR1 (SLURM's warning before pre-emption) asks for a checkpoint and exit."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def init_processes() -> torch.device:
    env = launch_env.discover()
    launch_env.export(env)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
    return device


def _agreed(fn: Callable[[], T]) -> T:
    """Run `fn` on every rank; if it raises a UserError anywhere, raise it everywhere, so one
    rank's bad input never leaves the others waiting in a collective."""
    try:
        result, error = fn(), None
    except UserError as err:
        result, error = None, str(err)
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise UserError(first)
    return result


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _fingerprint(config: Config, layout: str | None, dp: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the model's shapes and the parallel split."""
    m = config.model
    return {
        "layers": [list(vars(s).values()) for s in config.summary().layers],
        "d_model": m.d_model, "d_head": m.d_head, "vocab_size": m.vocab_size,
        "tie_embeddings": m.tie_embeddings, **block_fingerprint(m),
        "tp": config.parallel.tp, "pp": config.parallel.pp, "dp": dp,
        "pipeline_layout": layout, "zero_stage": config.zero.stage,
        "global_batch_size": config.train.global_batch_size,
    }


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def train(config: Config) -> dict[str, Any] | None:
    """Train to `train.max_steps` (or a pre-emption signal). Returns the summary on rank 0."""
    from megatron.core import parallel_state as ps

    from lws_megatron.model.compile import compile_chunks, compile_stats
    from lws_megatron.model.parallel import destroy_parallel, initialize_parallel
    from lws_megatron.training import data, schedule, step
    from lws_megatron.training.checkpoint import Checkpointer

    preemption = Preemption()
    device = init_processes()
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = _agreed(lambda: _check_and_plan(config, world))
    config.parallel.pipeline_layout = layout or ""
    initialize_parallel(config)
    try:
        dp = ps.get_data_parallel_world_size()
        t = config.train
        run_dir = Path(config.run.dir)
        sources = _agreed(lambda: data.resolve_sources(config, verify=rank == 0))
        chunks, engine, bf16 = build_engine(config, device, dp)
        compile_chunks(chunks, config.train.compile)
        train_ds, valid_ds = data.build_datasets(config, sources, dp, run_dir / "data_cache")
        summary = config.summary()
        peak, peak_source = device_peak_flops(device)
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(dump_config(config))
            _write_json(run_dir / "run_info.json", {
                "name": config.run.name or run_dir.name,
                "total_params": summary.total_params,
                "flops_per_token": summary.flops_per_token,
                "tokenizer_sha256": sources.tokenizer.fingerprint,
                "valid_data": [f"{p}_valid" for p in sources.prefixes],
                "valid_data_sha256": sources.valid_fingerprint,
                "world_size": world, "tp": config.parallel.tp, "pp": config.parallel.pp, "dp": dp,
                "zero_stage": config.zero.stage, "pipeline_layout": layout,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "precision": "bf16" if bf16 else "fp32",
                "peak_flops": peak, "peak_flops_source": peak_source,
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            })
        checkpointer = Checkpointer(run_dir, config.checkpoint.keep, _fingerprint(config, layout, dp))
        start_step, skipped_total = 0, 0
        latest = checkpointer.latest() if config.checkpoint.resume else None
        if latest is not None:
            state = _agreed(lambda: checkpointer.load(engine, latest))
            start_step, skipped_total = state["step"], state["skipped_steps"]
            if rank == 0:
                print(f"resumed from {latest} at step {start_step}", flush=True)
        writer = MetricsWriter(run_dir, enabled=rank == 0)
        valid_batches = (
            data.micro_batches(valid_ds, ps.get_data_parallel_rank() * data.eval_samples(config, 1),
                               data.eval_samples(config, 1), t.micro_batch_size)
            if valid_ds is not None else []
        )
        tokens_per_step = t.global_batch_size * config.model.seq_length
        consecutive_bad, interval = 0, _Interval()
        run_start, last_val = time.time(), None
        step_index = start_step
        last_saved = start_step if latest is not None else None
        while step_index < t.max_steps:
            lr = schedule.learning_rate(step_index, config.optim, t.max_steps)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            batches = data.step_batches(train_ds, step_index, t.global_batch_size,
                                        ps.get_data_parallel_rank(), dp, t.micro_batch_size)
            began = time.perf_counter()
            result = step.train_step(config, engine, chunks, batches, device,
                                     stop_requested=preemption.requested)
            elapsed = time.perf_counter() - began
            step_index += 1
            skipped_total += result.skipped
            consecutive_bad = consecutive_bad + 1 if result.skipped or not math.isfinite(result.loss) else 0
            interval.add(result, elapsed)
            if step_index % t.log_interval == 0 or step_index == t.max_steps:
                tps = interval.tokens_per_s(tokens_per_step)
                writer.log({
                    "step": step_index, "tokens": step_index * tokens_per_step,
                    "loss": interval.mean_loss(), "lr": lr, "grad_norm": result.grad_norm,
                    "tokens_per_s": tps,
                    "mfu": tps * summary.flops_per_token / (peak * world) if peak else 0.0,
                    "step_time_s": interval.mean_time(), "mem_gb": memory_gb(device),
                    "skipped_steps": skipped_total,
                })
                interval = _Interval()
            if config.eval.interval and valid_batches and (
                    step_index % config.eval.interval == 0 or step_index == t.max_steps):
                last_val = step.evaluate(config, chunks, valid_batches, device)
                writer.log({"step": step_index, "tokens": step_index * tokens_per_step,
                            "val_loss": last_val, "val_ppl": math.exp(min(last_val, 50.0))})
            stop_unstable = consecutive_bad >= t.max_nonfinite_steps
            preempted = result.stop_requested
            due = (config.checkpoint.interval and step_index % config.checkpoint.interval == 0)
            if due or preempted or stop_unstable or step_index == t.max_steps:
                if last_saved != step_index:
                    path = checkpointer.save(engine, step_index, {"skipped_steps": skipped_total})
                    last_saved = step_index
                    if rank == 0:
                        print(f"saved checkpoint {path}", flush=True)
            if stop_unstable:
                raise UserError(
                    f"{consecutive_bad} steps in a row had a non-finite loss or gradient "
                    f"(step {step_index}); a checkpoint was saved. Lower optim.lr, raise "
                    "optim.warmup_steps or check the data, then resume"
                )
            if preempted:
                if rank == 0:
                    print(f"pre-emption signal: checkpointed at step {step_index}, exiting",
                          flush=True)
                writer.close()
                return None
        writer.close()
        if rank != 0:
            return None
        final = _summary(run_dir, step_index, tokens_per_step, time.time() - run_start, last_val)
        if t.compile != "none":
            final.update(compile_stats())
            if final["graph_breaks"]:
                print(f"train.compile={t.compile}: {final['graph_breaks']} graph break(s) on "
                      "rank 0 (each splits the compiled region); TORCH_LOGS=graph_breaks "
                      "shows where", flush=True)
        _write_json(run_dir / "summary.json", final)
        return final
    finally:
        destroy_parallel()


def build_engine(config: Config, device: torch.device, dp: int):
    """The model chunks of this rank, eager, wrapped with AdamW in a DeepSpeed engine."""
    from lws_megatron.model.build import build_model_chunks, compute_dtype
    from lws_megatron.training import param_groups, zero

    _seed_everything(config.train.seed)
    chunks = build_model_chunks(config, device=device)
    bf16 = compute_dtype(config, device) == torch.bfloat16
    module = chunks[0] if len(chunks) == 1 else torch.nn.ModuleList(chunks)
    optimizer = torch.optim.AdamW(
        param_groups.param_groups(module, config.optim.weight_decay, config.optim.no_decay),
        lr=config.optim.lr, betas=tuple(config.optim.betas), eps=config.optim.eps,
        fused=True,
    )
    return chunks, zero.initialize_engine(config, module, optimizer, dp), bf16


def _check_and_plan(config: Config, world: int) -> str | None:
    from lws_megatron.model.parallel import check_parallel, check_world

    check_world(config, world)
    return check_parallel(config)


class _Interval:
    """Losses and times since the last logged step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.times: list[float] = []

    def add(self, result, seconds: float) -> None:
        if not result.skipped:
            self.losses.append(result.loss)
        self.times.append(seconds)

    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")

    def mean_time(self) -> float:
        return sum(self.times) / len(self.times)

    def tokens_per_s(self, tokens_per_step: int) -> float:
        return tokens_per_step * len(self.times) / sum(self.times)


def _summary(run_dir: Path, steps: int, tokens_per_step: int, wall: float,
             val_loss: float | None) -> dict[str, Any]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    train_records = [r for r in records if "loss" in r]
    later = train_records[1:] or train_records
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
