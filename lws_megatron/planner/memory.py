"""What a pipeline stage holds: model state per parameter, and the activations each block keeps
for backward, by precision, tensor and sequence parallelism and recomputation.

Pure arithmetic on the shape engine, shared by the planner and the runtime (which layers
`parallel.recompute` applies to, whether sequence parallelism is on), so that a plan and the
run it describes count the same things. The activation counts are those of the tensors
Megatron's layer saves for backward (tests/planner/test_activations.py traces a built layer and
compares, byte for byte on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from lws_megatron import shapes
from lws_megatron.config import Config, ModelConfig, device_precision
from lws_megatron.errors import UserError

FP32 = 4
TOKEN_ID_BYTES = 8  # int64 token ids, kept by the embedding for its gradient scatter
SOFTMAX_BYTES = 4  # Megatron's vocab-parallel cross-entropy keeps its softmax in fp32
LSE_BYTES = 4  # flash attention keeps a log-sum-exp per query head and token, fp32
# The fused loss keeps per token its fp32 log-sum-exp, the int64 target and a bool mask.
FUSED_LOSS_BYTES = 4 + 8 + 1

# RoPE keeps its cos and sin tables for the query and for the key: [s, d_head] each.
ROPE_TABLES = 4
# SwiGLU, in multiples of this rank's FFN width f: FC1's output (2f) and FC2's input (f), fused;
# composite, also the SiLU's output and the linear half's copy.
MLP = (3, 5)


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter and per activation element of a `train.precision`."""

    name: str
    activation: int  # the matmul and attention inputs saved for backward
    residual: int  # the residual stream (the norms' inputs)
    weight: int
    grad: int
    master: int  # fp32 master weights the optimizer keeps without ZeRO (ZeRO keeps its own)
    weight_copy: int = 0  # autocast's compute-dtype copies of the weights, held in a forward


PRECISIONS = {
    "fp32": Precision("fp32", activation=4, residual=4, weight=4, grad=4, master=0),
    "bf16": Precision("bf16", activation=2, residual=2, weight=2, grad=2, master=4),
    "bf16-autocast": Precision(
        "bf16-autocast", activation=2, residual=4, weight=4, grad=4, master=0, weight_copy=2
    ),
}


def precision_named(name: str, device: str) -> Precision:
    """`train.precision`'s accounting on `device` (cuda | cpu), auto resolved as a run there."""
    key = device_precision(name, device)
    if key not in PRECISIONS:
        raise UserError(f"precision {name!r}: choose one of auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[key]


def state_bytes_per_param(precision: Precision, zero: int, dp: int) -> float:
    """Model-state bytes per parameter after ZeRO sharding over DP.

    Weights, gradients, Adam's two fp32 moments and the fp32 master weights: kept by our
    optimizer for bf16 weights without ZeRO, by DeepSpeed's ZeRO optimizer (as its own copy)
    whatever the weights' dtype. ZeRO-1 and 2 shard the optimizer state, ZeRO-3 also the
    weights; the gradients stay whole on every rank at every stage (Megatron-Core DDP's
    buckets reduce them). Plus autocast's weight copies.
    """
    master = FP32 if zero >= 1 else precision.master
    weights = precision.weight
    optimizer = (2 * FP32 + master) / (dp if zero >= 1 else 1)
    return weights + precision.grad + optimizer + precision.weight_copy


def sequence_parallel(config: Config, tp: int) -> bool:
    """`parallel.sequence_parallel` at `tp`: auto is on at TP > 1 where the sequence splits
    evenly (the norm gains' partial gradients are summed over TP after the data-parallel
    reduction, at every ZeRO stage)."""
    wanted = config.parallel.sequence_parallel
    divides = config.model.seq_length % tp == 0
    if wanted is True and tp > 1 and not divides:
        raise UserError(
            f"parallel.sequence_parallel=true splits model.seq_length={config.model.seq_length} "
            f"over parallel.tp={tp} ranks; use a multiple of {tp}, or "
            "parallel.sequence_parallel=false"
        )
    if wanted == "auto":
        wanted = divides
    return tp > 1 and wanted


@dataclass(frozen=True)
class Saving:
    """The run's settings that decide what a block keeps for backward."""

    precision: Precision
    tp: int = 1
    micro_batch: int = 1
    sequence_parallel: bool = False
    # CUDA's fused RMSNorm and SwiGLU (and Inductor's kernels) keep only their inputs; the
    # CPU's composite ones also keep intermediate results (ATTENTION, MLP).
    fused_kernels: bool = True
    # Compiled, sequence-parallel linear layers keep their gathered input (model/compile.py).
    compiled: bool = False
    loss_chunk_rows: int = 4096  # model.loss_chunk_rows: the fused loss's logits at a time

    @classmethod
    def of(cls, config: Config, precision: Precision, device: str) -> Saving:
        tp, compiled = config.parallel.tp, config.train.compile != "none"
        return cls(
            precision=precision,
            tp=tp,
            micro_batch=config.train.micro_batch_size,
            sequence_parallel=sequence_parallel(config, tp),
            fused_kernels=device == "cuda" or compiled,
            compiled=compiled,
            loss_chunk_rows=config.model.loss_chunk_rows,
        )

    @property
    def sequence_split(self) -> int:
        """The split of d-wide tensors along the sequence (1 without sequence parallelism)."""
        return self.tp if self.sequence_parallel else 1


@dataclass(frozen=True)
class Activations:
    """Bytes of one micro batch: `kept` from forward to backward, and `rebuilt`, held only in
    the block's own backward (one block at a time): the activations a recomputing layer makes
    again and the gradients its backward works on, the head's backward transients."""

    kept: float
    rebuilt: float = 0.0


def layer_activations(
    shape: shapes.LayerShape, dims: ModelConfig, saving: Saving, recompute: str = "none"
) -> Activations:
    """What one layer keeps for backward, per micro batch, under `recompute` (none |
    selective | full) for this layer.

    Per token: the two norms' inputs (d, residual stream) and, composite, their outputs; the
    QKV and FC1 inputs (d); the attention (`_attention`) and the MLP (MLP) at this rank's
    widths; and RoPE's tables. Sequence parallelism splits the d-wide tensors. Selective
    recomputation keeps the MLP's input only; full keeps the layer's input only. Backward
    works on the gradients of FC1's output (2f) and of the residual stream (2d), rebuilt.
    """
    p, tp, split = saving.precision, saving.tp, saving.sequence_split
    tokens = saving.micro_batch * dims.seq_length
    d, e = dims.d_model, p.activation
    f = shape.ffn_hidden_size / tp
    composite = 0 if saving.fused_kernels else 1
    norms = 2 * d * (p.residual + composite * e) / split
    linear_inputs = 2 * d * e / (1 if saving.compiled else split)
    mlp = e * MLP[composite] * f
    rope = ROPE_TABLES * dims.seq_length * dims.d_head * e
    whole = tokens * (norms + linear_inputs + _attention(shape, dims, saving) + mlp) + rope
    working = tokens * e * (2 * f + 2 * d / split)
    if recompute == "full":
        kept = tokens * d * p.residual / split
        return Activations(kept, whole - kept + working)
    if recompute == "selective":
        return Activations(whole - tokens * mlp, tokens * mlp + working)
    return Activations(whole, working)


def _attention(shape: shapes.LayerShape, dims: ModelConfig, saving: Saving) -> float:
    """Bytes per token of the attention on this rank, q = heads * d_head and k = kv_heads *
    d_head wide: the q/k/v projection's output (q + 2k: the value is a view of it, which keeps
    all of it), RoPE's query and key, the attention's output (also the output projection's
    input) and its fp32 log-sum-exp. A QK-norm adds its normalised query and key where it is
    composite (always for `full`, our own module), and its input copy of the query where the
    query heads of several KV groups had to be gathered from the projection's output."""
    tp, kind = saving.tp, dims.qk_norm
    q = shape.num_query_heads * dims.d_head / tp
    k = shape.num_kv_heads * dims.d_head / tp
    grouped = shape.num_kv_heads // tp > 1 and shape.num_query_heads > shape.num_kv_heads
    copy = kind != "none" and grouped
    normalised = kind == "full" or (kind == "head" and not saving.fused_kernels)
    kept = (3 + copy + normalised) * q + (3 + normalised) * k
    return saving.precision.activation * kept + LSE_BYTES * shape.num_query_heads / tp


def head_activations(
    dims: ModelConfig, vocab: int, saving: Saving, fused_loss: bool
) -> Activations:
    """The final norm, the output layer and the loss, per micro batch.

    Megatron's head keeps the norm's input, the output layer's input and the fp32 softmax; in
    bf16 the softmax's gradient is cast for the output layer (rebuilt). The fused loss keeps
    the whole-sequence input and a few numbers per token (model/fused_loss.py), and makes one
    chunk of logits at a time (rebuilt: the fp32 logits, and their compute-dtype matmul).
    """
    p, split = saving.precision, saving.sequence_split
    tokens = saving.micro_batch * dims.seq_length
    d, e, shard = dims.d_model, p.activation, vocab / saving.tp
    composite = 0 if saving.fused_kernels else 1
    norm = d * (p.residual + composite * e) / split
    if fused_loss:
        rows = min(saving.loss_chunk_rows, tokens)
        chunk = rows * shard * (SOFTMAX_BYTES + (e if e < SOFTMAX_BYTES else 0))
        return Activations(tokens * (norm + e * d + FUSED_LOSS_BYTES), chunk)
    linear_input = e * d / (1 if saving.compiled else split)
    cast = e * shard if e < SOFTMAX_BYTES else 0
    return Activations(tokens * (norm + linear_input + SOFTMAX_BYTES * shard), tokens * cast)


def recomputed_layers(config: Config) -> tuple[int, ...]:
    """The layers `parallel.recompute` applies to (0-based, ascending); () when it is none."""
    p, n = config.parallel, config.model.num_layers
    if p.recompute == "none":
        return ()
    kind, chosen = p.recompute_layer_choice()
    if kind == "all":
        return tuple(range(n))
    if kind == "list":
        return tuple(sorted(chosen))
    return tuple(sorted(widest_layers(config)[:chosen]))


def widest_layers(config: Config) -> list[int]:
    """Every layer number, the one that keeps the most activation bytes for backward first,
    ties in layer order. Ranked per token in fp32 at TP=1: an order of the shapes alone."""
    saving = Saving(PRECISIONS["fp32"])
    kept = [layer_activations(s, config.model, saving).kept for s in config.summary().layers]
    return sorted(range(len(kept)), key=lambda i: (-kept[i], i))
