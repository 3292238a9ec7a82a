"""RMSNorm for Megatron's local (non-TE) spec that sequence parallelism can split.

Megatron's `WrappedTorchNorm` refuses `sequence_parallel`. Under sequence parallelism each TP rank
normalises its own slice of the sequence, so the gain's gradient comes out partial on each rank;
like Transformer Engine's `TENorm`, this norm marks its gain `sequence_parallel`, and
`grads.sync_model_parallel_grads` sums the gradients of gains so marked over the TP group.
The arithmetic is torch's RMSNorm's, with or without sequence parallelism.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.RMSNorm):
    """`torch.nn.RMSNorm(hidden_size, eps)` built with the arguments Megatron builds norms with."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel
