"""Host waits for the device in training steps: each one leaves the GPU idle while the host
catches up, so a steady step should have none and a log interval one (its read)."""

from __future__ import annotations

import time

import torch

from lws_megatron.config import Config
from lws_megatron.device import count_syncs, default_device, synchronize
from lws_megatron.measure.batches import global_batch
from lws_megatron.training import distributed, forward
from lws_megatron.training.data import Batch
from lws_megatron.training.step_stats import StepStats
from lws_megatron.training.train_module import TrainModule


def steps(module: TrainModule, batches: list[Batch], tokens: int, count: int, stats: StepStats):
    """`count` training steps on the same batches, their numbers added to `stats`."""
    for _ in range(count):
        stats.add(module.train_batch(batches, tokens))


def sync_counts(module: TrainModule, batches: list[Batch], tokens: int, count: int):
    """(host waits inside `count` steps, host waits of the one read after them), counted as
    `device.count_syncs` counts. The batches' tokens are counted beforehand, as the loader
    counts them, so the host's own reads of its batches stay out."""
    stats = StepStats(module.device)
    with count_syncs(module.device) as in_steps:
        steps(module, batches, tokens, count, stats)
    with count_syncs(module.device) as in_read:
        stats.read(time.perf_counter())
    synchronize(module.device)
    return in_steps.count, in_read.count


def first_sync(config: Config, warmup: int = 3, count: int = 2) -> str | None:
    """Steady-state steps under `torch.cuda.set_sync_debug_mode("error")`, where any host wait
    for the device raises: None if there was none, else the error's first line. CUDA only;
    needs an initialised default process group of one rank."""
    device = default_device()
    with distributed.model_parallel(config) as plan:
        module = TrainModule(config, plan, device)
        module.compile()
        batches = global_batch(config, plan)
        tokens = forward.loss_tokens(batches)
        stats = StepStats(device)
        steps(module, batches, tokens, warmup, stats)
        stats.read(time.perf_counter())
        synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            steps(module, batches, tokens, count, stats)
        except RuntimeError as err:
            return str(err).strip().splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        stats.read(time.perf_counter())
    return None
