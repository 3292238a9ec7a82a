"""Micro batches through the model chunks: the forward step Megatron's schedules call, its loss,
and the schedule run over one global batch.

The loss of a step is the mean over every unmasked token of the global batch, whatever the
split into data-parallel ranks and micro batches: each micro batch contributes its token-loss
sum divided by the global token count (known before the first forward), so DP=2, micro 2 x 2
and micro 4 x 1 train on the same number.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model

from lws_megatron.device import autocast, host_values
from lws_megatron.model import ModelArgs, check_batch
from lws_megatron.training.data import Batch
from lws_megatron.training.step_stats import ForwardClock

LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]
ForwardStep = Callable[[Iterator[Batch] | None, torch.nn.Module], tuple[torch.Tensor, LossFunc]]


def forward_step(args: ModelArgs) -> ForwardStep:
    """A schedule's forward_step_func for batches {tokens, labels, loss_mask}.

    Only chunks that hold the embedding or the output head draw a batch from the iterator
    (it may be None on the other stages). Each drawn batch passes `check_batch` where it lies
    (on the CPU, no device wait, for a loader's batch), then moves to the model's device
    without a host wait (from pinned memory, a loader's batch).
    `model` may be a GPTModel or a wrapper of one (a DeepSpeed engine).
    """

    def step(data_iterator: Iterator[Batch] | None, model: torch.nn.Module):
        gpt = get_attr_wrapped_model(model, "pre_process", return_model_obj=True)
        device = next(gpt.parameters()).device
        if not (gpt.pre_process or gpt.post_process):
            with autocast(device, args.autocast_dtype):
                return model(None, None, None), partial(loss_func, None)
        batch = next(data_iterator)
        check_batch(batch["tokens"], args.model.vocab_size, args.model.seq_length, batch["labels"])
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        tokens = batch["tokens"] if gpt.pre_process else None
        labels = batch["labels"] if gpt.post_process else None
        with autocast(device, args.autocast_dtype):
            output = model(tokens, None, None, labels=labels)
        return output, partial(loss_func, batch["loss_mask"] if gpt.post_process else None)

    return step


def loss_func(
    loss_mask: torch.Tensor | None, per_token_loss: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(masked loss sum, token count, report) as Megatron's schedules take it.

    The report holds [loss sum, tokens] for averaging across micro-batches and ranks.
    """
    losses = per_token_loss.float().reshape(-1)
    mask = loss_mask.to(losses).reshape(-1)
    loss_sum = (losses * mask).sum()
    tokens = mask.sum()
    return loss_sum, tokens.to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), tokens])}


def loss_tokens(batches: list[Batch]) -> int:
    """This rank's loss tokens, counted on the host batches (a loader hands them over counted)."""
    return round(float(sum(b["loss_mask"].sum() for b in batches)))


def step_totals(
    local_tokens: int, stop_requested: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss tokens of the whole global batch, ranks asking to stop), on the device.

    One all-reduce over the world, fed from the host without waiting for the device: each
    data-parallel replica's tokens are counted by its first model-parallel rank only.
    """
    counts = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage(
        ignore_virtual=True
    )
    values = host_values([local_tokens if counts else 0, float(stop_requested)], device)
    dist.all_reduce(values)
    values = values.float()
    return values[0], values[1]


def world_sums(loss_sum: torch.Tensor, tokens: torch.Tensor, *flags: torch.Tensor) -> torch.Tensor:
    """[mean loss per token, flag sums...] over the world, in one all-reduce on the device.

    The loss is held by the last stage's first TP rank of each DP rank; a flag counts the
    ranks that raise it. Nothing here waits for the device.
    """
    holder = (
        ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    )
    loss = loss_sum.detach().float() if holder else torch.zeros((), device=tokens.device)
    values = torch.stack([loss, *(f.float() for f in flags)])
    dist.all_reduce(values)
    return torch.cat([values[:1] / tokens, values[1:]])


def run_schedule(
    *,
    args: ModelArgs,
    chunks,
    batches: list[Batch],
    device: torch.device,
    tokens: torch.Tensor,
    scale: float,
    forward_only: bool,
    clock: ForwardClock | None = None,
) -> torch.Tensor:
    """Megatron's forward-backward schedule (1F1B with PP > 1) over `chunks` (in Megatron's DDP
    for a training step, whose hooks it drives); returns the local loss sum. `clock` times each
    micro batch's forward."""
    sums: list[torch.Tensor] = []
    model_step = forward_step(args)

    def scaled_step(iterator, model):
        with clock.timed() if clock else contextlib.nullcontext():
            output, model_loss = model_step(iterator, model)

        def loss(output_tensor):
            loss_sum, _, report = model_loss(output_tensor)
            sums.append(loss_sum.detach())
            # The schedule divides a 2-tuple's loss by the number of micro batches, and
            # DDP averages gradients over DP: `scale` undoes both.
            return loss_sum * scale / tokens, report

        return output, loss

    vpp = len(chunks)
    get_forward_backward_func()(
        forward_step_func=scaled_step,
        data_iterator=[iter(batches) for _ in range(vpp)] if vpp > 1 else iter(batches),
        model=chunks,
        num_microbatches=len(batches),
        seq_length=args.model.seq_length,
        micro_batch_size=batches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )
    return torch.stack(sums).sum() if sums else torch.zeros((), device=device)
