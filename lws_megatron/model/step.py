"""One micro-batch through a model chunk, in the form Megatron's pipeline schedules call.

`forward_step(config)` is the `forward_step_func` of
`megatron.core.pipeline_parallel.get_forward_backward_func()`; the loss it returns is the
mean cross-entropy over the tokens whose `loss_mask` is 1.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator

import torch
from megatron.core.utils import get_attr_wrapped_model

from lws_megatron.config import Config
from lws_megatron.model.build import autocast
from lws_megatron.model.inputs import check_batch

Batch = dict[str, torch.Tensor]  # tokens, labels: [b, s] int; loss_mask: [b, s]
LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


def forward_step(
    config: Config,
) -> Callable[[Iterator[Batch] | None, torch.nn.Module], tuple[torch.Tensor, LossFunc]]:
    """A schedule's forward_step_func for batches {tokens, labels, loss_mask}.

    Only chunks that hold the embedding or the output head draw a batch from the iterator
    (it may be None on the other stages). Each drawn batch passes `check_batch` where it lies
    (on the CPU, no device sync, for a loader's batch), then moves to the model's device.
    """

    def step(data_iterator: Iterator[Batch] | None, model: torch.nn.Module):
        gpt = get_attr_wrapped_model(model, "pre_process", return_model_obj=True)
        device = next(gpt.parameters()).device
        if not (gpt.pre_process or gpt.post_process):
            with autocast(config, device):
                return model(None, None, None), partial(loss_func, None)
        batch = next(data_iterator)
        check_batch(batch["tokens"], config, batch["labels"])
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        tokens = batch["tokens"] if gpt.pre_process else None
        labels = batch["labels"] if gpt.post_process else None
        with autocast(config, device):
            output = model(tokens, None, None, labels=labels)
        return output, partial(loss_func, batch["loss_mask"] if gpt.post_process else None)

    return step


def loss_func(
    loss_mask: torch.Tensor | None, per_token_loss: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(masked loss sum, token count, report) as Megatron 0.16's schedules take it.

    The schedule divides the sum by the token count and the number of micro-batches.
    The report holds [loss sum, tokens] for averaging across micro-batches and ranks.
    """
    losses = per_token_loss.float().reshape(-1)
    mask = loss_mask.to(losses).reshape(-1)
    loss_sum = (losses * mask).sum()
    tokens = mask.sum()
    return loss_sum, tokens.to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), tokens])}
