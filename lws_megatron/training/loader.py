"""Training batches built ahead of the step that needs them, in background workers.

The data position is the step (`data.step_batches`): a torch DataLoader over steps, its sampler
counting from the resumed step, keeps that exactly, while `data.num_workers` processes read
and stack the samples, count the loss tokens on the host and (on CUDA) pin the batches, so the
forward step's copy to the device is queued without a host wait.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from lws_megatron.training.data import Batch, step_batches
from lws_megatron.training.distributed import ParallelPlan
from lws_megatron.training.forward import loss_tokens

PREFETCH_STEPS = 2  # batches each worker keeps ready


class StepData(NamedTuple):
    step: int
    batches: list[Batch]  # this data-parallel rank's micro batches of the step's global batch
    loss_tokens: int  # their loss tokens, counted on the host


class StepBatches(Dataset):
    """Item k: this data-parallel rank's micro batches of global batch k."""

    def __init__(self, dataset, plan: ParallelPlan, dp_rank: int) -> None:
        self.dataset, self.plan, self.dp_rank = dataset, plan, dp_rank

    def __getitem__(self, step: int) -> StepData:
        batches = step_batches(self.dataset, step, self.plan, self.dp_rank)
        return StepData(step, batches, loss_tokens(batches))


def step_loader(
    dataset,
    plan: ParallelPlan,
    dp_rank: int,
    first_step: int,
    max_steps: int,
    num_workers: int,
    device: torch.device,
) -> Iterator[StepData]:
    """Steps first_step .. max_steps-1 in order; with `num_workers` 0, built when asked for."""
    loader = DataLoader(
        StepBatches(dataset, plan, dp_rank),
        batch_size=None,
        sampler=range(first_step, max_steps),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=PREFETCH_STEPS if num_workers else None,
    )
    yield from loader
