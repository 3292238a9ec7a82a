"""Synthetic token batches: what a benchmark trains on when no data is needed."""

from __future__ import annotations

import torch

from lws_megatron.config import Config
from lws_megatron.training.data import Batch
from lws_megatron.training.distributed import ParallelPlan


def synthetic_batch(config: Config, micro: int, seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    s = config.model.seq_length
    text = torch.randint(0, config.model.vocab_size, (micro, s + 1), generator=generator)
    return {
        "tokens": text[:, :-1].contiguous(),
        "labels": text[:, 1:].contiguous(),
        "loss_mask": torch.ones(micro, s),
    }


def global_batch(config: Config, plan: ParallelPlan) -> list[Batch]:
    """This rank's synthetic micro batches of one global batch."""
    return [
        synthetic_batch(config, plan.micro_batch_size, seed) for seed in range(plan.micro_batches)
    ]
