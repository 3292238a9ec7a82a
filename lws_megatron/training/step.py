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
    stop_requested: bool = False  # some rank was asked to stop (a pre-emption signal)


def _global_tokens(batches: list[Batch], device: torch.device) -> torch.Tensor:
    total = torch.stack([b["loss_mask"].sum() for b in batches]).sum().to(device)
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    return total


def _world_sums(loss_sum: torch.Tensor, tokens: torch.Tensor,
                *flags: bool | torch.Tensor) -> torch.Tensor:
    """[mean loss per token, flag sums...] over the world, in one all-reduce on the device.

    The loss is held by the last stage's first TP rank of each DP rank; a flag counts the
    ranks that raise it. Nothing here waits for the device: the step reads all its numbers at
    once, with one host sync.
    """
    holder = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    loss = loss_sum.detach().float() if holder else torch.zeros((), device=tokens.device)
    values = torch.stack([loss, *(torch.as_tensor(f, dtype=torch.float32, device=tokens.device)
                                  for f in flags)])
    dist.all_reduce(values)
    return torch.cat([values[:1] / tokens, values[1:]])


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


def _local_nonfinite(chunks) -> torch.Tensor:
    """1.0 if some local gradient holds an inf or a NaN (one fused norm, on the device)."""
    grads = _grads(chunks)
    if not grads:
        return torch.zeros(())
    return (~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())).float()


def train_step(config: Config, engine, chunks, batches: list[Batch], device: torch.device,
               stop_requested: bool = False) -> StepResult:
    """One optimizer step; `stop_requested` (this rank's pre-emption flag) rides along with the
    loss, so the whole step waits for the device once."""
    tokens = _global_tokens(batches, device)
    dp = ps.get_data_parallel_world_size()
    if uses_deepspeed_backward(config):
        return _deepspeed_step(config, engine, batches, device, tokens, dp, stop_requested)
    loss_sum = _schedule(config, chunks, batches, device, tokens, dp * len(batches), False)
    if config.zero.stage == 0:
        return _plain_step(config, engine, chunks, loss_sum, tokens, dp, stop_requested)
    loss, stops, nonfinite = _world_sums(loss_sum, tokens, stop_requested,
                                         _local_nonfinite(chunks)).tolist()
    if nonfinite or not math.isfinite(loss):
        engine.zero_grad()
        return StepResult(loss, float("nan"), skipped=True, stop_requested=stops > 0)
    sync_model_parallel_grads(chunks)
    engine.allreduce_gradients()
    engine.step()
    return StepResult(loss, _grad_norm(engine), skipped=False, stop_requested=stops > 0)


def _plain_step(config: Config, engine, chunks, loss_sum, tokens, dp, stop_requested) -> StepResult:
    """Without ZeRO: reduce, then read loss, stop flag and gradient norm in one sync.

    A non-finite gradient anywhere makes the norm non-finite on every rank (the norm sums over
    the model-parallel group after the DP reduction), so every rank skips the same step.
    """
    sync_model_parallel_grads(chunks)
    if dp > 1:
        # Alone, DeepSpeed's stage-0 reduction still flattens, scales and copies back every
        # gradient: ~740 kernels a step on the 18-layer model, for nothing.
        engine.allreduce_gradients()
    norm_sq = _counted_norm_sq(chunks, tokens.device)
    loss, stops, norm = torch.cat([_world_sums(loss_sum, tokens, stop_requested),
                                   norm_sq.sqrt().reshape(1)]).tolist()
    if not (math.isfinite(loss) and math.isfinite(norm)):
        engine.zero_grad()
        return StepResult(loss, float("nan"), skipped=True, stop_requested=stops > 0)
    max_norm = config.optim.clip_grad
    if max_norm > 0 and norm > max_norm:
        torch._foreach_mul_(_grads(chunks), max_norm / (norm + 1e-6))
    engine.step()
    return StepResult(loss, norm, skipped=False, stop_requested=stops > 0)


def _deepspeed_step(config: Config, engine, batches: list[Batch], device, tokens, dp,
                    stop_requested: bool) -> StepResult:
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
    loss, stops = _world_sums(loss_sum, tokens, stop_requested).tolist()
    skipped = engine.skipped_steps > skipped_before
    return StepResult(loss, float("nan") if skipped else _grad_norm(engine), skipped, stops > 0)


def _counted_norm_sq(chunks, device: torch.device) -> torch.Tensor:
    """Squared L2 norm of the whole model's gradients, on the device.

    DeepSpeed's stage-0 clipping would count every parameter of a later pipeline stage as a
    duplicate; here each weight counts once: TP-split ones on every TP rank, replicated ones on
    TP rank 0, and a tied output head only on the first stage.
    """
    tp_rank = ps.get_tensor_model_parallel_rank()
    counted = [p.grad for c in chunks for p in c.parameters()
               if p.grad is not None and not getattr(p, "shared", False)
               and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0)]
    total = (torch.stack(torch._foreach_norm(counted)).float().pow(2).sum() if counted
             else torch.zeros((), device=device))
    dist.all_reduce(total, group=ps.get_model_parallel_group())
    return total


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
    return _world_sums(loss_sum, tokens).item()
