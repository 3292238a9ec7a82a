"""What each step does, as pure functions of the step, so resuming needs no state: its learning
rate, and what it is due for once done (a log line, an evaluation, a checkpoint)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lws_megatron.config import Config, OptimConfig


def learning_rate(step: int, optim: OptimConfig, max_steps: int) -> float:
    """constant (the paper's), warmup + cosine to min_lr, or warmup-stable-decay (linear decay
    over the last `decay_fraction` of training). `step`: 0-based, the step about to run."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    if optim.schedule == "cosine":
        span = max(1, max_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))
    decay_steps = round(optim.decay_fraction * max_steps)
    decay_start = max_steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return optim.lr
    progress = (step - decay_start + 1) / decay_steps
    return optim.lr + (optim.min_lr - optim.lr) * min(1.0, progress)


@dataclass(frozen=True)
class Due:
    """What the step just done is due for; computed once by the trainer, read by the callbacks
    (nothing is due by default)."""

    log: bool = False  # every `train.log_interval` steps and the last
    eval: bool = False  # every `eval.interval` steps and the last, when evaluation is on
    checkpoint: bool = False  # every `checkpoint.interval` steps and the last
    final: bool = False  # the step is `train.max_steps`

    @property
    def anything(self) -> bool:
        return self.log or self.eval or self.checkpoint


def due(step: int, config: Config) -> Due:
    """`step`: the number of steps done (the one just done, 1-based)."""
    final = step == config.train.max_steps

    def every(interval: int) -> bool:
        return bool(interval) and (step % interval == 0 or final)

    return Due(
        log=every(config.train.log_interval),
        eval=every(config.eval.interval),
        checkpoint=every(config.checkpoint.interval) or final,
        final=final,
    )
