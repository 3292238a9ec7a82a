"""The train module: this rank's model chunks, their optimizer inside a DeepSpeed ZeRO engine,
the compute precision, and the forward/backward of one global batch.

The trainer's loop only ever calls `train_batch`, `eval_batch` and `set_lr`; checkpoints save
and restore `engine`. Every ZeRO stage runs the same forward step (`forward.forward_step`):
stages 0/1 under Megatron's schedules (1F1B with PP > 1) with the DP reduction at the end,
stages 2/3 (PP = 1) through `engine.backward`, which reduces inside backward hooks.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from lws_megatron.config import Config
from lws_megatron.device import host_values
from lws_megatron.model import ModelArgs, build_model_chunks, sync_model_parallel_grads
from lws_megatron.model.compile import check_cuda_graphs, compile_chunks
from lws_megatron.training import forward, zero
from lws_megatron.training.data import Batch
from lws_megatron.training.distributed import ParallelPlan
from lws_megatron.training.optimizer import build_optimizer
from lws_megatron.training.precision import resolve_precision
from lws_megatron.training.step_stats import ForwardClock, StepResult, StopRequests


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_args(config: Config, plan: ParallelPlan, device: torch.device) -> ModelArgs:
    """The model a run of `config` builds under `plan` on `device`."""
    precision = resolve_precision(config.train.precision, device)
    return ModelArgs.from_config(
        config,
        layout=plan.layout,
        dtype=precision.compute,
        params_dtype=precision.params,
        fused_kernels=config.train.compile == "none",
    )


class TrainModule:
    def __init__(self, config: Config, plan: ParallelPlan, device: torch.device):
        self.config, self.plan, self.device = config, plan, device
        self.precision = resolve_precision(config.train.precision, device)
        self.args = model_args(config, plan, device)
        if config.train.cuda_graphs:
            check_cuda_graphs(config.train.compile, device, plan.tp, plan.pp)
        seed_everything(config.train.seed)
        self.chunks = build_model_chunks(self.args, seed=config.train.seed, device=device)
        module = self.chunks[0] if len(self.chunks) == 1 else torch.nn.ModuleList(self.chunks)
        optimizer = build_optimizer(config, module, self.args.params_dtype)
        bf16_weights = self.args.params_dtype == torch.bfloat16
        self.engine = zero.initialize_engine(config, module, optimizer, plan.dp, bf16_weights)
        self.stop_requests, self.clock = StopRequests(device), ForwardClock(device)

    def compile(self) -> None:
        """`train.compile`: after the engine wraps the chunks, so DeepSpeed hooks eager modules."""
        compile_chunks(self.chunks, self.config.train.compile, self.config.train.cuda_graphs)

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def train_batch(
        self, batches: list[Batch], loss_tokens: int | None = None, stop_requested: bool = False
    ) -> StepResult:
        """One optimizer step over this rank's micro batches of a global batch, queued on the
        device without waiting for it (ZeRO-0; DeepSpeed's ZeRO optimizers read the device
        inside their own step).

        `loss_tokens`: this rank's loss tokens, counted where the batches were built (counted
        here from the host batches when not given). `stop_requested` (this rank asks the run to
        stop) rides along with the token count, into `stop_requests`.
        """
        if loss_tokens is None:
            loss_tokens = forward.loss_tokens(batches)
        if self.config.train.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are free
        tokens, stops = forward.step_totals(loss_tokens, stop_requested, self.device)
        self.stop_requests.record(stops)
        if zero.uses_deepspeed_backward(self.config):
            return self._engine_backward_step(batches, tokens)
        loss_sum = forward.run_schedule(
            self.args,
            self.chunks,
            batches,
            self.device,
            tokens,
            self.plan.dp * len(batches),
            False,
            clock=self.clock,
        )
        if self.config.zero.stage == 0:
            return self._plain_step(loss_sum, tokens)
        loss, nonfinite = forward.world_sums(loss_sum, tokens, _local_nonfinite(self.chunks))
        flagged, mean = torch.stack([nonfinite, loss]).tolist()
        if flagged or not math.isfinite(mean):
            self.engine.zero_grad()
            return self._result(loss, None, True)
        sync_model_parallel_grads(self.chunks)
        self.engine.allreduce_gradients()
        self.engine.step()
        return self._result(loss, self.engine.get_global_grad_norm(), False)

    @torch.no_grad()
    def eval_batch(self, batches: list[Batch]) -> float:
        """Mean loss per token over the given micro batches of every DP rank."""
        for chunk in self.chunks:
            chunk.eval()
        if self.config.train.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        tokens, _ = forward.step_totals(forward.loss_tokens(batches), False, self.device)
        loss_sum = forward.run_schedule(
            self.args, self.chunks, batches, self.device, tokens, 1.0, True
        )
        for chunk in self.chunks:
            chunk.train()
        return forward.world_sums(loss_sum, tokens).item()

    def _plain_step(self, loss_sum, tokens) -> StepResult:
        """Without ZeRO: reduce, clip and skip on the device.

        A non-finite gradient anywhere makes the norm non-finite on every rank (the norm sums
        over the model-parallel group after the DP reduction), and the loss is all-reduced, so
        every rank raises the same `found_inf`: fused AdamW then leaves weights, moments and
        step count as they were. Clipping is fused AdamW's `grad_scale` (it divides each
        gradient by max(1, norm / clip_grad)): no pass over the gradients of its own.
        """
        sync_model_parallel_grads(self.chunks)
        if self.plan.dp > 1:
            # Alone, DeepSpeed's stage-0 reduction still flattens, scales and copies back every
            # gradient: ~740 kernels a step on the 18-layer model, for nothing.
            self.engine.allreduce_gradients()
        norm = _counted_norm_sq(self.chunks, tokens.device).sqrt()
        (loss,) = forward.world_sums(loss_sum, tokens)
        found_inf = (~(torch.isfinite(loss) & torch.isfinite(norm))).float()
        optimizer = self.engine.optimizer
        optimizer.found_inf = found_inf
        max_norm = self.config.optim.clip_grad
        optimizer.grad_scale = (
            torch.clamp((norm + 1e-6) / max_norm, min=1.0) if max_norm > 0 else None
        )
        self.engine.step()
        return StepResult(loss, torch.where(found_inf > 0, math.nan, norm), found_inf)

    def _engine_backward_step(self, batches: list[Batch], tokens) -> StepResult:
        """ZeRO-2/3 (PP = 1): each micro batch through engine.backward; DeepSpeed skips a step
        whose gradients are not finite, and we count it from its skipped-step counter."""
        engine, dp = self.engine, self.plan.dp
        skipped_before = engine.skipped_steps
        loss_sum = torch.zeros((), device=self.device)
        step = forward.forward_step(self.args)
        for batch in batches:
            with self.clock.timed():
                output, _ = step(iter([batch]), engine)
            batch_sum, _, _ = forward.loss_func(batch["loss_mask"].to(self.device), output)
            engine.backward(batch_sum * dp / tokens, scale_wrt_gas=False)
            engine.step()
            loss_sum += batch_sum.detach()
        (loss,) = forward.world_sums(loss_sum, tokens)
        skipped = engine.skipped_steps > skipped_before
        return self._result(loss, None if skipped else engine.get_global_grad_norm(), skipped)

    def _result(self, loss, norm, skipped: bool) -> StepResult:
        """A StepResult of DeepSpeed's ZeRO step (which has read the device already): its
        norm is a number, a tensor or None."""
        norm = math.nan if norm is None else float(norm)
        skip, norm = host_values([float(skipped), norm], self.device).float()
        return StepResult(loss, norm, skip)


def _grads(chunks) -> list[torch.Tensor]:
    return [p.grad for c in chunks for p in c.parameters() if p.grad is not None]


def _local_nonfinite(chunks) -> torch.Tensor:
    """1.0 if some local gradient holds an inf or a NaN (one fused norm, on the device)."""
    grads = _grads(chunks)
    if not grads:
        return torch.zeros(())
    return (~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())).float()


def _counted_norm_sq(chunks, device: torch.device) -> torch.Tensor:
    """Squared L2 norm of the whole model's gradients, on the device.

    DeepSpeed's stage-0 clipping would count every parameter of a later pipeline stage as a
    duplicate; here each weight counts once: TP-split ones on every TP rank, replicated ones on
    TP rank 0, and a tied output head only on the first stage.
    """
    tp_rank = ps.get_tensor_model_parallel_rank()
    counted = [
        p.grad
        for c in chunks
        for p in c.parameters()
        if p.grad is not None
        and not getattr(p, "shared", False)
        and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0)
    ]
    total = (
        torch.stack(torch._foreach_norm(counted, 2, dtype=torch.float32)).pow(2).sum()
        if counted
        else torch.zeros((), device=device)
    )
    dist.all_reduce(total, group=ps.get_model_parallel_group())
    return total
