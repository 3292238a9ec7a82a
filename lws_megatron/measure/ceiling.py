"""The matmul rate at the step's shapes: what the step's matrix multiplies could reach."""

from __future__ import annotations

import time

import torch

from lws_megatron.config import Config
from lws_megatron.device import default_device, synchronize


def gemm_ceiling(config: Config, repeats: int = 20) -> list[dict]:
    """TFLOP/s of the compute dtype's matrix multiply at the step's shapes (tokens x d_model by
    the widest FFN, and by the vocabulary), on random operands."""
    device = default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = config.train.micro_batch_size * config.model.seq_length
    widest = max(shape.ffn_hidden_size for shape in config.summary().layers)
    rows = []
    for name, n in (("ffn", widest), ("head", config.model.vocab_size)):
        a = torch.randn(tokens, config.model.d_model, device=device, dtype=dtype)
        b = torch.randn(config.model.d_model, n, device=device, dtype=dtype)
        a @ b
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        seconds = (time.perf_counter() - start) / repeats
        flops = 2 * tokens * config.model.d_model * n
        rows.append(
            {
                "gemm": name,
                "shape": [tokens, config.model.d_model, n],
                "dtype": str(dtype),
                "tflops": flops / seconds / 1e12,
            }
        )
    return rows
