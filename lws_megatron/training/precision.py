"""`train.precision`: the compute dtype a run's forward passes use on a device."""

from __future__ import annotations

import torch

from lws_megatron.errors import UserError


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """auto is bf16 on CUDA and fp32 elsewhere.

    Weights, gradients and optimizer state stay fp32 (the master copy); bf16 is the autocast
    dtype of the matrix multiplies and attention, as in PyTorch's mixed-precision recipe.
    """
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type != "cuda":
        raise UserError(
            "train.precision=bf16 needs a CUDA device: Megatron's linear layers keep autocast "
            "in their backward only on CUDA; use train.precision=fp32 (or auto) on CPU"
        )
    return torch.bfloat16 if precision == "bf16" else torch.float32
