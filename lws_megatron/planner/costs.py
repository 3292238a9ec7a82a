"""What each block of an LWS model costs a pipeline stage: compute, state and activation bytes
(the bytes from `memory.py`).

Pure arithmetic on the shape engine (no torch), so every rank of a training job derives the
same numbers. A *block* is one transformer layer, the input embedding or the output head
(final norm, output layer and cross-entropy); a pipeline stage holds a contiguous run of
layers, the first stage also the embedding, the last also the head.
"""

from __future__ import annotations

from dataclasses import dataclass

from lws_megatron import shapes
from lws_megatron.config import Config, ModelConfig
from lws_megatron.planner.memory import (
    TOKEN_ID_BYTES,
    Precision,
    Saving,
    head_activations,
    layer_activations,
    precision_named,
    recomputed_layers,
    state_bytes_per_param,
)

RECOMPUTE = ("none", "selective", "full")
# Softmax cross-entropy over the logits: max, subtract, exp, sum forward; softmax minus one-hot
# and scaling backward. Elementwise, so tiny next to the output layer's 6 * d_model per logit.
CROSS_ENTROPY_FLOPS_PER_LOGIT = 8


@dataclass(frozen=True)
class Block:
    """One unit a stage holds. `cost` is in the model's unit; `params` are per TP rank.
    `activation_bytes` are kept per micro batch in flight; `transient_bytes` are held once, in
    the block's own backward (a recomputed layer's activations, made again)."""

    cost: float
    params: float
    activation_bytes: float
    transient_bytes: float = 0.0


@dataclass(frozen=True)
class Timings:
    """Measured forward+backward seconds of one micro batch, per distinct layer shape."""

    layers: dict[shapes.LayerShape, float]
    embedding: float
    output: float


@dataclass(frozen=True)
class CostModel:
    """Every block's cost and bytes, and what one parameter costs in model-state bytes."""

    layers: tuple[Block, ...]
    embedding: Block
    output: Block
    bytes_per_param: float
    unit: str


def recompute_flops(shape: shapes.LayerShape, dims: ModelConfig, recompute: str) -> int:
    """FLOPs per token a layer's recomputation adds: its forward again (full), or its MLP's
    forward (selective); training FLOPs are three forwards."""
    if recompute == "full":
        return shapes.layer_flops_per_token(shape, dims) // 3
    if recompute == "selective":
        return 2 * 3 * dims.d_model * shape.ffn_hidden_size
    return 0


def cost_model(
    config: Config,
    *,
    pp: int,
    dp: int = 1,
    precision: Precision | None = None,
    timings: Timings | None = None,
    device: str = "cuda",
) -> CostModel:
    """The blocks of `config` at its TP size, ZeRO stage and recomputation, for PP ranks and
    DP replicas, with `device`'s kernels (cuda | cpu) and `precision` (default train.precision
    on `device`).

    Compute is training FLOPs per token from the shape engine (matrix multiplies and causal
    attention at the configured sequence length; the embedding 0; the head adds the
    cross-entropy; a recomputed layer its forward again), or measured seconds per micro batch
    (`timings`), scaled alike. A tied embedding is held twice when the head sits on another
    rank (PP > 1).
    """
    precision = precision or precision_named(config.train.precision, device)
    tp, dims = config.parallel.tp, config.model
    summary = config.summary(tp)
    vocab = shapes.padded_vocab_size(dims, tp)
    tokens = config.train.micro_batch_size * dims.seq_length
    norms = shapes.layer_params(shapes.LayerShape(0, 0, 0), dims)
    saving = Saving.of(config, precision, device)
    recomputed = set(recomputed_layers(config))

    def layer(i: int, shape: shapes.LayerShape, params: int, flops: int) -> Block:
        recompute = config.parallel.recompute if i in recomputed else "none"
        acts = layer_activations(shape, dims, saving, recompute)
        scale = 1 + recompute_flops(shape, dims, recompute) / flops
        return Block(
            cost=float(flops if timings is None else timings.layers[shape]) * scale,
            params=(params - norms) / tp + norms,
            activation_bytes=acts.kept,
            transient_bytes=acts.rebuilt,
        )

    head = head_activations(dims, vocab, saving, config.model.fused_loss)
    head_params = summary.output_params or (summary.embedding_params if pp > 1 else 0)
    head_flops = summary.head_flops_per_token + CROSS_ENTROPY_FLOPS_PER_LOGIT * vocab
    blocks = zip(summary.layers, summary.layer_params, summary.layer_flops)
    return CostModel(
        layers=tuple(layer(i, *block) for i, block in enumerate(blocks)),
        embedding=Block(
            cost=0.0 if timings is None else timings.embedding,
            params=summary.embedding_params / tp,
            activation_bytes=tokens * TOKEN_ID_BYTES,
        ),
        output=Block(
            cost=float(head_flops if timings is None else timings.output),
            params=head_params / tp + summary.final_norm_params,
            activation_bytes=head.kept,
            transient_bytes=head.rebuilt,
        ),
        bytes_per_param=state_bytes_per_param(precision, config.zero.stage, dp),
        unit="FLOPs/token" if timings is None else "s/micro-batch",
    )


def micro_batches_in_flight(pp: int, vpp: int, micro_batches: int) -> tuple[int, ...]:
    """Most micro batches whose activations a virtual stage holds at once, per chunk.

    Chunk c is virtual stage c // pp of rank c % pp (Megatron's layout order). 1F1B without
    interleaving: rank r runs pp - r - 1 warm-up forwards, so it holds pp - r. Interleaved:
    Megatron's schedule is replayed (warm-up (pp - r - 1) * 2 + (vpp - 1) * pp forwards, then
    one forward and one backward per step) and each chunk's peak count taken; summing these
    peaks bounds the rank's true peak from above.
    """
    if vpp == 1:
        return tuple(min(pp - r, micro_batches) for r in range(pp))
    table = [
        (chunk, mb)
        for group in range(0, micro_batches, pp)
        for chunk in range(vpp)
        for mb in range(group, min(group + pp, micro_batches))
    ]
    counts = []
    for r in range(pp):
        warmup = min((pp - r - 1) * 2 + (vpp - 1) * pp, len(table))
        held, peak = [0] * vpp, [0] * vpp
        forwards = iter(table)
        for _ in range(warmup):
            held[next(forwards)[0]] += 1
        for chunk, _ in table:
            step = next(forwards, None)
            if step is not None:
                held[step[0]] += 1
            peak = [max(a, b) for a, b in zip(peak, held)]
            held[vpp - 1 - chunk] -= 1
        counts.append(peak)
    return tuple(counts[c % pp][c // pp] for c in range(pp * vpp))
