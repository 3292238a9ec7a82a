"""What each block of an LWS model costs a pipeline stage: compute, state and activation bytes.

Pure arithmetic on the shape engine (no torch), so every rank of a training job derives the
same numbers. A *block* is one transformer layer, the input embedding or the output head
(final norm, output layer and cross-entropy); a pipeline stage holds a contiguous run of
layers, the first stage also the embedding, the last also the head.
"""

from __future__ import annotations

from dataclasses import dataclass

from lws_megatron import shapes
from lws_megatron.config import Config
from lws_megatron.errors import UserError

RECOMPUTE = ("none", "full")
# Softmax cross-entropy over the logits: max, subtract, exp, sum forward; softmax minus one-hot
# and scaling backward. Elementwise, so tiny next to the output layer's 6 * d_model per logit.
CROSS_ENTROPY_FLOPS_PER_LOGIT = 8
# Token ids kept by the embedding for its gradient scatter (int64).
TOKEN_ID_BYTES = 8
# Megatron's vocab-parallel cross-entropy keeps the softmax in fp32 for its backward.
SOFTMAX_BYTES = 4
# Flash attention keeps the softmax log-sum-exp, fp32, per query head and token.
LSE_BYTES = 4


@dataclass(frozen=True)
class Precision:
    """What the runtime stores in which dtype. Weights, gradients and Adam state stay fp32 in
    both precisions (bf16 is autocast's, `model.build.autocast`); bf16 changes the saved
    activations and adds autocast's bf16 weight copies, held through a forward."""

    name: str
    activation: int  # per element of the matmul and attention inputs saved for backward
    residual: int  # per element of the residual stream: fp32, as the fp32 embedding starts it
    weight_copy: int  # per parameter: autocast's compute-dtype copies of the weights


PRECISIONS = {
    "bf16": Precision("bf16", activation=2, residual=4, weight_copy=2),
    "fp32": Precision("fp32", activation=4, residual=4, weight_copy=0),
}
FP32 = 4


@dataclass(frozen=True)
class Block:
    """One unit a stage holds. `cost` is in the model's unit; `params` are per TP rank."""

    cost: float
    params: float
    activation_bytes: float


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


def state_bytes_per_param(precision: Precision, zero: int, dp: int) -> float:
    """Model-state bytes per parameter after ZeRO sharding over DP.

    fp32 weights, gradients and Adam's two moments (16 bytes). ZeRO-1 shards the optimizer
    state, to which DeepSpeed's ZeRO optimizer adds its own fp32 copy of the weights; ZeRO-2
    also shards the gradients, ZeRO-3 also the weights. Plus autocast's weight copies.
    """
    weights = FP32 / (dp if zero >= 3 else 1)
    grads = FP32 / (dp if zero >= 2 else 1)
    optimizer = (2 * FP32 + (FP32 if zero >= 1 else 0)) / (dp if zero >= 1 else 1)
    return weights + grads + optimizer + precision.weight_copy


def layer_activation_bytes(
    shape: shapes.LayerShape,
    dims: shapes.Dims,
    *,
    tp: int,
    micro_batch: int,
    precision: Precision,
    recompute: str,
) -> float:
    """Bytes one layer keeps for its backward, per micro batch of `micro_batch` sequences.

    Korthikanti et al. (2022), adapted to this layer: flash attention (no s^2 terms), no
    dropout, RMSNorm, GQA and SwiGLU with the layer's own widths q = heads * d_head,
    k = kv_heads * d_head, f = ffn. Per token: the two norms' inputs (2 d, residual stream);
    in the activation dtype the QKV and FC1 inputs (2 d), QK-norm inputs (q + k), flash
    attention's q, k, v and output (2 q + 2 k; the output is also the projection's input),
    SwiGLU's input (2 f) and FC2's input (f); plus the fp32 log-sum-exp per query head.
    Without sequence parallelism the d-wide tensors are whole on every TP rank. Full
    recomputation keeps only the layer's input (d, residual stream).
    """
    tokens = micro_batch * dims.seq_length
    d, e = dims.d_model, precision.activation
    if recompute == "full":
        return tokens * precision.residual * d
    q = shape.num_query_heads * dims.d_head
    k = shape.num_kv_heads * dims.d_head
    attention = (2 if dims.qk_norm == "none" else 3) * (q + k)
    per_token = precision.residual * 2 * d + e * 2 * d
    per_token += e * (attention + 3 * shape.ffn_hidden_size) / tp
    per_token += LSE_BYTES * shape.num_query_heads / tp
    return tokens * per_token


def cost_model(
    config: Config,
    *,
    pp: int,
    dp: int = 1,
    precision: Precision = PRECISIONS["bf16"],
    recompute: str = "none",
    timings: Timings | None = None,
) -> CostModel:
    """The blocks of `config` at its TP size and ZeRO stage, for PP ranks and DP replicas.

    Compute is training FLOPs per token from the shape engine (matrix multiplies and causal
    attention at the configured sequence length; the embedding lookup counts 0; the head
    adds the cross-entropy), or measured seconds per micro batch when `timings` are given.
    A tied embedding is held twice when the head sits on another rank (PP > 1).
    """
    if recompute not in RECOMPUTE:
        raise UserError(f"recompute={recompute!r}: choose one of {', '.join(RECOMPUTE)}")
    tp, dims = config.parallel.tp, config.dims
    summary = config.summary(tp)
    vocab = shapes.padded_vocab_size(dims, tp)
    micro_batch = config.train.micro_batch_size
    tokens = micro_batch * dims.seq_length
    norms = shapes.layer_params(shapes.LayerShape(0, 0, 0), dims)
    per_layer = dict(tp=tp, micro_batch=micro_batch, precision=precision, recompute=recompute)
    # The head holds the final norm's input, the output layer's input and the fp32 softmax.
    width = (precision.residual + precision.activation) * dims.d_model
    head_bytes = tokens * (width + SOFTMAX_BYTES * vocab / tp)

    def layer(shape: shapes.LayerShape, params: int, flops: int) -> Block:
        return Block(
            cost=float(flops if timings is None else timings.layers[shape]),
            params=(params - norms) / tp + norms,
            activation_bytes=layer_activation_bytes(shape, dims, **per_layer),
        )

    head_params = summary.output_params or (summary.embedding_params if pp > 1 else 0)
    head_flops = summary.head_flops_per_token + CROSS_ENTROPY_FLOPS_PER_LOGIT * vocab
    return CostModel(
        layers=tuple(
            layer(s, p, f)
            for s, p, f in zip(summary.layers, summary.layer_params, summary.layer_flops)
        ),
        embedding=Block(
            cost=0.0 if timings is None else timings.embedding,
            params=summary.embedding_params / tp,
            activation_bytes=tokens * TOKEN_ID_BYTES,
        ),
        output=Block(
            cost=float(head_flops if timings is None else timings.output),
            params=head_params / tp + summary.final_norm_params,
            activation_bytes=head_bytes,
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
