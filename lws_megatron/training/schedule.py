"""Learning-rate schedules as pure functions of the step (0-based), so resuming needs no state."""

from __future__ import annotations

import math

from lws_megatron.config import OptimConfig


def learning_rate(step: int, optim: OptimConfig, max_steps: int) -> float:
    """constant (the paper's), warmup + cosine to min_lr, or warmup-stable-decay (linear decay
    over the last `decay_fraction` of training)."""
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
