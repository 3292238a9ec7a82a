"""How long a data-parallel step waits for communication: `launch/bench.py` under torchrun.

Each timed step is split at two points the train module passes through: the schedule's
`finalize` (waiting for the gradient buckets still being reduced when backward ends) and the
optimizer step (at ZeRO >= 1, DeepSpeed's update of this rank's shard and the all-gather of
the updated weights). On CUDA each span is a pair of events on the compute stream, so a span is
the time the device stalled there, and nothing waits for the device between steps; on a CPU
it is the host clock.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from lws_megatron.benchmark import synthetic_batch
from lws_megatron.config import Config
from lws_megatron.device import default_device, synchronize
from lws_megatron.training import distributed, forward
from lws_megatron.training.train_module import TrainModule


@dataclass(frozen=True)
class DPTiming:
    world: int
    dp: int
    zero_stage: int
    overlap: bool
    step_ms: float  # medians over the timed steps
    grad_wait_ms: float  # finalize: the gradient reduction left when backward ends
    optimizer_ms: float  # the optimizer step (with ZeRO's weight all-gather)
    steps: int

    def line(self) -> str:
        return (
            f"DP={self.dp} (world {self.world}) ZeRO {self.zero_stage} "
            f"overlap={'on' if self.overlap else 'off'}: step {self.step_ms:.1f} ms, "
            f"waiting for gradients {self.grad_wait_ms:.1f} ms, "
            f"optimizer and weight gather {self.optimizer_ms:.1f} ms (medians of {self.steps})"
        )

    to_dict = asdict


class _Spans:
    """Start/end marks of one named span per step, read once at the end."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.marks = cuda, []

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def around(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = self.mark()
            try:
                return fn(*args, **kwargs)
            finally:
                self.marks.append((start, self.mark()))

        return timed

    def ms(self) -> list[float]:
        if self.cuda:
            return [a.elapsed_time(b) for a, b in self.marks]
        return [1000 * (b - a) for a, b in self.marks]


def time_dp_step(config: Config, steps: int, warmup: int) -> DPTiming:
    """Needs the job's default process group (torchrun); every rank calls it."""
    device = default_device()
    cuda = device.type == "cuda"
    with distributed.model_parallel(config) as plan:
        module = TrainModule(config, plan, device)
        module.compile()
        schedule_config = module.model[0].config
        waits, updates, whole = _Spans(cuda), _Spans(cuda), _Spans(cuda)
        schedule_config.finalize_model_grads_func = waits.around(
            schedule_config.finalize_model_grads_func
        )
        module.engine.step = updates.around(module.engine.step)
        batches = [
            synthetic_batch(config, plan.micro_batch_size, 100 * plan.dp + i)
            for i in range(plan.micro_batches)
        ]
        tokens = forward.loss_tokens(batches)
        step = whole.around(module.train_batch)
        for i in range(warmup + steps):
            if i == warmup:
                for spans in (waits, updates, whole):
                    spans.marks.clear()
            step(batches, tokens)
        synchronize(device)
        return DPTiming(
            world=plan.world,
            dp=plan.dp,
            zero_stage=config.zero.stage,
            overlap=config.zero.overlap_grad_reduce,
            step_ms=statistics.median(whole.ms()),
            grad_wait_ms=statistics.median(waits.ms()),
            optimizer_ms=statistics.median(updates.ms()),
            steps=steps,
        )
