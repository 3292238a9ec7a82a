"""`train.precision`: the dtypes a run's weights and matrix multiplies use on a device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lws_megatron.config import device_precision
from lws_megatron.errors import UserError


@dataclass(frozen=True)
class PrecisionPolicy:
    name: str  # fp32 | bf16 | bf16-autocast
    compute: torch.dtype  # of the matrix multiplies and attention
    params: torch.dtype  # of the model's weights (the optimizer keeps an fp32 master copy)


def resolve_precision(precision: str, device: torch.device) -> PrecisionPolicy:
    """The dtypes of `precision` on `device`; auto as `config.device_precision` resolves it.

    bf16: the modules hold bf16 weights and run without autocast (as Megatron-LM's bf16 runs),
    the optimizer updates an fp32 master copy and copies it back. bf16-autocast: fp32 weights
    and gradients with bf16 autocast around the forward (PyTorch's mixed-precision recipe);
    CUDA only, because Megatron's linear layers keep autocast in their backward only there.
    """
    precision = device_precision(precision, device.type)
    if precision == "bf16-autocast" and device.type != "cuda":
        raise UserError(
            "train.precision=bf16-autocast needs a CUDA device: Megatron's linear layers keep "
            "autocast in their backward only on CUDA; use train.precision=bf16 or fp32 on CPU"
        )
    if precision == "fp32":
        return PrecisionPolicy("fp32", torch.float32, torch.float32)
    params = torch.bfloat16 if precision == "bf16" else torch.float32
    return PrecisionPolicy(precision, torch.bfloat16, params)
