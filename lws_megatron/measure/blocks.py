"""A built chunk's blocks timed alone: forward + backward of one micro batch."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lws_megatron.config import Config
from lws_megatron.device import autocast, synchronize
from lws_megatron.measure.batches import synthetic_batch
from lws_megatron.model.fused_loss import FusedLossGPTModel


@dataclass(frozen=True)
class LayerTiming:
    ffn_hidden_size: int
    num_query_heads: int
    num_kv_heads: int
    layers: list[int]
    seconds: float


class BlockTimer:
    """Forward + backward of one micro batch through a built chunk's own blocks, alone: its
    input embedding, any run of its layers, its head (final norm, output layer, cross-entropy).

    What the benchmark reports per layer shape and what the pipeline planner calibrates on:
    the very Megatron modules that train, in the run's compute dtype and attention kernel.
    """

    def __init__(self, chunk, config: Config, micro: int, device: torch.device, dtype: torch.dtype):
        self.chunk, self.device, self.dtype = chunk, device, dtype
        s, d = config.model.seq_length, config.model.d_model
        batch = synthetic_batch(config, micro)
        self.tokens, self.labels = batch["tokens"].to(device), batch["labels"].to(device)
        self.hidden = torch.randn(s, micro, d, device=device)
        self.grad = torch.randn_like(self.hidden)
        self.rope = chunk.rotary_pos_emb(s)

    def step(self, embedding: bool, layers: list, head: bool) -> None:
        chunk = self.chunk
        with autocast(self.device, self.dtype):
            if embedding:
                x = chunk.embedding(input_ids=self.tokens, position_ids=None)
            else:
                x = self.hidden.detach().requires_grad_()
            for layer in layers:
                x, _ = layer(x, attention_mask=None, rotary_pos_emb=self.rope)
            if head:
                out = head_loss(chunk, chunk.decoder.final_layernorm(x), self.labels).mean()
        if head:
            out.backward()
        else:
            x.backward(self.grad.to(x.dtype))

    def seconds(self, embedding: bool, layers: list, head: bool) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        self.step(embedding, layers, head)
        synchronize(self.device)
        return time.perf_counter() - start


def head_loss(chunk, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The chunk's own head: output layer and cross-entropy, or the fused one."""
    if isinstance(chunk, FusedLossGPTModel) and chunk.fused:
        return chunk.head_loss(hidden, labels)
    weight = (
        chunk.shared_embedding_or_output_weight()
        if chunk.share_embeddings_and_output_weights
        else None
    )
    logits, _ = chunk.output_layer(hidden, weight=weight)
    return chunk.compute_language_model_loss(labels, logits).float()


def time_layers(
    chunk, config: Config, micro: int, device: torch.device, dtype: torch.dtype, repeats: int = 5
) -> list[LayerTiming]:
    """Forward + backward seconds of one micro batch through each distinct layer shape."""
    timer = BlockTimer(chunk, config, micro, device, dtype)
    shapes = config.summary().layers
    by_shape: dict[tuple[int, int, int], list[int]] = {}
    layers = {}
    for layer in chunk.decoder.layers:
        shape = shapes[layer.layer_number - 1]
        key = (shape.ffn_hidden_size, shape.num_query_heads, shape.num_kv_heads)
        by_shape.setdefault(key, []).append(layer.layer_number - 1)
        layers.setdefault(key, layer)
    timings = []
    for key, layer in layers.items():
        best = min(timer.seconds(False, [layer], False) for _ in range(repeats + 1))
        timings.append(LayerTiming(*key, layers=by_shape[key], seconds=best))
    chunk.zero_grad(set_to_none=True)
    return timings
