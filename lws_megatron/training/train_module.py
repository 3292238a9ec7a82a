"""The train module: this rank's model chunks, their optimizer inside a DeepSpeed ZeRO engine,
the compute precision, and the forward/backward of one global batch.

The trainer's loop only ever calls `train_batch`, `eval_batch` and `set_lr`; checkpoints save
`state_dict()` and restore it with `load_state_dict`. Every ZeRO stage runs one step: Megatron's
schedule over the chunks in Megatron's DDP (`data_parallel.py`, which reduces the gradients
during backward), the norm, clipping and skip on the device, then the optimizer of `zero.py`.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from lws_megatron.config import Config
from lws_megatron.model import ModelArgs, build_model_chunks
from lws_megatron.model.compile import check_cuda_graphs, compile_chunks
from lws_megatron.training import data_parallel, forward, model_state, weight_gather, zero
from lws_megatron.training.data import Batch
from lws_megatron.training.distributed import ParallelPlan
from lws_megatron.training.optimizer import build_optimizer
from lws_megatron.training.precision import resolve_precision
from lws_megatron.training.rng import rng_state, set_rng_state
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
        z = config.zero
        runs = None
        if z.stage >= 1 and z.overlap_param_gather and plan.dp > 1:
            runs = weight_gather.segments(self.chunks, z, plan.dp)
        optimizer = build_optimizer(config, module, self.args.params_dtype, runs)
        bf16_weights = self.args.params_dtype == torch.bfloat16
        self.engine = zero.initialize_engine(config, module, optimizer, plan.dp, bf16_weights)
        self.stop_requests, self.clock = StopRequests(device), ForwardClock(device)
        self.adamw = zero.fused_adamw(self.engine)
        self.model = data_parallel.wrap_chunks(
            self.chunks, z, self.args.params_dtype, plan.micro_batches
        )
        self.weight_gather = None
        if runs:
            compiled = config.train.compile != "none"
            self.weight_gather = weight_gather.install(
                self.engine, self.model, runs, compiled, self.clock
            )
        self.params = [p for c in self.chunks for p in c.parameters() if p.requires_grad]

    def compile(self) -> None:
        """`train.compile`: after the engine and DDP hook the eager modules' parameters."""
        compile_chunks(self.chunks, self.config.train.compile, self.config.train.cuda_graphs)

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def train_batch(
        self, batches: list[Batch], loss_tokens: int | None = None, stop_requested: bool = False
    ) -> StepResult:
        """One optimizer step over this rank's micro batches of a global batch, queued on the
        device without waiting for it, at every ZeRO stage.

        Megatron's schedule runs forward and backward (1F1B with PP > 1) and, through DDP's
        hooks, reduces each bucket of the last micro batch's gradients during its backward.
        Then every rank holds the whole reduced gradient: the norm, the clipping (fused AdamW's
        `grad_scale`, dividing by max(1, norm / clip_grad)) and the skip of a non-finite step
        (its `found_inf`: weights, moments and step count stay as they were) are computed on
        the device, the same on every rank. The ZeRO stage decides only who updates what:
        every rank all of AdamW, or DeepSpeed each rank its shard; it then starts the
        all-gather of the new weights, which the next forward waits for segment by segment
        (`weight_gather.py`).

        `loss_tokens`: this rank's loss tokens, counted where the batches were built (counted
        here from the host batches when not given). `stop_requested` (this rank asks the run to
        stop) rides along with the token count, into `stop_requests`. A number to log is one
        more entry of the result's metrics, under its name in metrics.jsonl.
        """
        if loss_tokens is None:
            loss_tokens = forward.loss_tokens(batches)
        if self.config.train.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are free
        tokens, stops = forward.step_totals(loss_tokens, stop_requested, self.device)
        self.stop_requests.record(stops)
        data_parallel.zero_grad(self.model)
        loss_sum = forward.run_schedule(
            args=self.args,
            chunks=self.model,
            batches=batches,
            device=self.device,
            tokens=tokens,
            scale=self.plan.dp * len(batches),
            forward_only=False,
            clock=self.clock,
        )
        (loss,) = forward.world_sums(loss_sum, tokens)
        norm = _counted_norm_sq(self.model, self.device).sqrt()
        found_inf = (~(torch.isfinite(loss) & torch.isfinite(norm))).float()
        self.adamw.found_inf = found_inf
        max_norm = self.config.optim.clip_grad
        self.adamw.grad_scale = (
            torch.clamp((norm + 1e-6) / max_norm, min=1.0) if max_norm > 0 else None
        )
        zero.hand_over_grads(self.engine, self.params)
        self.engine.step()
        return StepResult(found_inf, {"loss": (loss, "mean"), "grad_norm": (norm, "last")})

    def state_dict(self, loading: bool = False) -> dict[str, Any]:
        """What a checkpoint holds of this rank, layout-free (`model_state.py`):
        `sharded`, the Megatron ShardedTensors this rank saves (or, `loading`, reads into in
        place): the chunks' weights and the optimizer's fp32 masters and Adam moments, whatever
        the ZeRO stage; `common`, the same on every rank (the optimizer's step count); `rank`,
        this rank's own (its RNG states). The learning rate is the schedule's, a function of
        the step."""
        if self.weight_gather is not None:
            self.weight_gather.wait()  # the weights the last step updated, gathered whole
        dp_rank, dp = ps.get_data_parallel_rank(), self.plan.dp
        pieces = [piece for chunk in self.chunks for piece in model_state.pieces(chunk)]
        fragments = zero.fragments(self.engine, self.params, None if loading else (dp_rank, dp))
        return {
            "sharded": model_state.weights(pieces, dp_rank, dp, loading)
            + model_state.optimizer_state(pieces, fragments, loading),
            "common": {"optimizer_step": zero.optimizer_step(self.engine)},
            "rank": {"rng": rng_state()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The rest of a restore, once a checkpoint has filled `state_dict(loading=True)`'s
        tensors: the step count and the RNG states it read."""
        zero.set_optimizer_step(self.engine, state["common"]["optimizer_step"])
        set_rng_state(state["rank"]["rng"])

    @torch.no_grad()
    def eval_batch(self, batches: list[Batch]) -> float:
        """Mean loss per token over the given micro batches of every DP rank."""
        for chunk in self.chunks:
            chunk.eval()
        if self.config.train.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        tokens, _ = forward.step_totals(forward.loss_tokens(batches), False, self.device)
        loss_sum = forward.run_schedule(
            args=self.args,
            chunks=self.model,
            batches=batches,
            device=self.device,
            tokens=tokens,
            scale=1.0,
            forward_only=True,
        )
        for chunk in self.chunks:
            chunk.train()
        return forward.world_sums(loss_sum, tokens).item()


def _counted_norm_sq(chunks, device: torch.device) -> torch.Tensor:
    """Squared L2 norm of the whole model's reduced gradients, on the device.

    DeepSpeed's clipping would count every parameter of a later pipeline stage as a
    duplicate; here each weight counts once: TP-split ones on every TP rank, replicated ones on
    TP rank 0, and a tied output head only on the first stage.
    """
    tp_rank = ps.get_tensor_model_parallel_rank()
    counted = [
        p.main_grad
        for c in chunks
        for p in c.parameters()
        if p.requires_grad
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
