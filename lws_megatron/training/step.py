"""One optimizer step and one evaluation pass, over Megatron's schedules or DeepSpeed's backward.

The loss of a step is the mean over every unmasked token of the global batch, whatever the
split into data-parallel ranks and micro batches: each micro batch contributes its token-loss
sum divided by the global token count (known before the first forward), so DP=2, micro 2 x 2
and micro 4 x 1 train on the same number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from lws_megatron.config import Config
from lws_megatron.model import check_batch, sync_model_parallel_grads
from lws_megatron.model.build import autocast
from lws_megatron.model.step import forward_step, loss_func
from lws_megatron.training.data import Batch
from lws_megatron.training.zero import uses_deepspeed_backward


@dataclass(frozen=True)
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool


def _global_tokens(batches: list[Batch], device: torch.device) -> torch.Tensor:
    total = torch.stack([b["loss_mask"].sum() for b in batches]).sum().to(device)
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    return total


def _mean_over_world(loss_sum: torch.Tensor, tokens: torch.Tensor) -> float:
    """Sum the loss held by the last stage's first TP rank of each DP rank over the world."""
    holder = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    value = loss_sum.detach().float() if holder else torch.zeros((), device=tokens.device)
    dist.all_reduce(value)
    return (value / tokens).item()


def _schedule(config: Config, chunks, batches: list[Batch], device: torch.device,
              tokens: torch.Tensor, scale: float, forward_only: bool) -> torch.Tensor:
    """Megatron's forward-backward schedule (1F1B with PP > 1); returns the local loss sum."""
    sums: list[torch.Tensor] = []
    model_step = forward_step(config)

    def scaled_step(iterator, model):
        output, model_loss = model_step(iterator, model)

        def loss(output_tensor):
            loss_sum, _, report = model_loss(output_tensor)
            sums.append(loss_sum.detach())
            # The schedule divides a 2-tuple's loss by the number of micro batches, and
            # DeepSpeed averages gradients over DP: `scale` undoes both.
            return loss_sum * scale / tokens, report

        return output, loss

    vpp = len(chunks)
    get_forward_backward_func()(
        forward_step_func=scaled_step,
        data_iterator=[iter(batches) for _ in range(vpp)] if vpp > 1 else iter(batches),
        model=chunks,
        num_microbatches=len(batches),
        seq_length=config.model.seq_length,
        micro_batch_size=batches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )
    return torch.stack(sums).sum() if sums else torch.zeros((), device=device)


def _grads(chunks) -> list[torch.Tensor]:
    return [p.grad for c in chunks for p in c.parameters() if p.grad is not None]


def _local_grads_finite(chunks) -> bool:
    """One fused norm over every gradient: finite iff no gradient holds an inf or a NaN."""
    grads = _grads(chunks)
    return not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()))


def any_rank(flag: bool, device: torch.device) -> bool:
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def train_step(config: Config, engine, chunks, batches: list[Batch],
               device: torch.device) -> StepResult:
    tokens = _global_tokens(batches, device)
    dp = ps.get_data_parallel_world_size()
    if uses_deepspeed_backward(config):
        return _deepspeed_step(config, engine, batches, device, tokens, dp)
    loss_sum = _schedule(config, chunks, batches, device, tokens, dp * len(batches), False)
    loss = _mean_over_world(loss_sum, tokens)
    if any_rank(not math.isfinite(loss) or not _local_grads_finite(chunks), device):
        engine.zero_grad()
        return StepResult(loss, float("nan"), skipped=True)
    sync_model_parallel_grads(chunks)
    engine.allreduce_gradients()
    norm = clip_grad_norm(chunks, config.optim.clip_grad) if config.zero.stage == 0 else None
    engine.step()
    return StepResult(loss, _grad_norm(engine) if norm is None else norm, skipped=False)


def _deepspeed_step(config: Config, engine, batches: list[Batch], device, tokens, dp) -> StepResult:
    """ZeRO-2/3 (PP = 1): each micro batch through engine.backward; DeepSpeed skips a step whose
    gradients are not finite, and we count it from its skipped-step counter."""
    skipped_before = engine.skipped_steps
    loss_sum = torch.zeros((), device=device)
    for batch in batches:
        check_batch(batch["tokens"], config, batch["labels"])
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast(config, device):
            output = engine(batch["tokens"], None, None, labels=batch["labels"])
        s, _, _ = loss_func(batch["loss_mask"], output)
        engine.backward(s * dp / tokens, scale_wrt_gas=False)
        engine.step()
        loss_sum += s.detach()
    loss = _mean_over_world(loss_sum, tokens)
    skipped = engine.skipped_steps > skipped_before
    return StepResult(loss, float("nan") if skipped else _grad_norm(engine), skipped)


def clip_grad_norm(chunks, max_norm: float) -> float:
    """Global L2 norm of the gradients of the whole model, clipped to `max_norm` (0: no clip).

    Without ZeRO, DeepSpeed's clipping would count every parameter of a later pipeline stage
    as a duplicate; here each weight counts once: TP-split ones on every TP rank, replicated
    ones on TP rank 0, and a tied output head only on the first stage.
    """
    tp_rank = ps.get_tensor_model_parallel_rank()
    grads = _grads(chunks)
    counted = [p.grad for c in chunks for p in c.parameters()
               if p.grad is not None and not getattr(p, "shared", False)
               and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0)]
    device = grads[0].device if grads else torch.device("cpu")
    total = (torch.stack(torch._foreach_norm(counted)).float().pow(2).sum() if counted
             else torch.zeros((), device=device))
    dist.all_reduce(total, group=ps.get_model_parallel_group())
    norm = total.sqrt().item()
    if max_norm > 0 and norm > max_norm:
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
    return norm


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


@torch.no_grad()
def evaluate(config: Config, chunks, batches: list[Batch], device: torch.device) -> float:
    """Mean validation loss per token over the fixed validation batches of every DP rank."""
    for chunk in chunks:
        chunk.eval()
    tokens = _global_tokens(batches, device)
    loss_sum = _schedule(config, chunks, batches, device, tokens, 1.0, True)
    for chunk in chunks:
        chunk.train()
    return _mean_over_world(loss_sum, tokens)
