"""The LWS shape engine: per-layer FFN widths and head counts, parameters and FLOPs.

Pure math (numpy, no torch), implementing ``docs/method.md`` exactly, so that the
planner, `describe` and the model builder all read one source of truth. Its inputs are the
config's sections: `profile`, the `lws` section, and `dims`, the `model` section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from lws_megatron.errors import UserError

if TYPE_CHECKING:
    from lws_megatron.config import LWSConfig, ModelConfig


@dataclass(frozen=True)
class LayerShape:
    ffn_hidden_size: int
    num_query_heads: int
    num_kv_heads: int


@dataclass(frozen=True)
class TPAdjustment:
    """A layer whose query heads TP-aware rounding moved away from the plain spec rounding."""

    layer: int
    heads_before: int
    heads_after: int


def make_divisible(v: float, d: int) -> int:
    """OpenELM's rounding (docs/method.md, Rounding): nearest multiple, never more than 10% down."""
    if v < d:
        return d
    r = int(v + d / 2) // d * d
    if r <= 0.9 * v:
        return r + d
    return r


def interpolate(knots: tuple[float, ...], n: int) -> list[float]:
    """Per-layer multipliers from knots (docs/method.md, Profiles)."""
    k = len(knots)
    if k == 0:
        raise UserError("a profile needs at least one knot; give e.g. [4.0] or [1.0, 4.0]")
    if k == 1 or (k > 2 and len(set(knots)) == 1):
        return [float(knots[0])] * n
    if k == 2:
        if n == 1 and knots[0] != knots[1]:
            raise UserError(
                f"a 2-knot profile {list(knots)} needs at least 2 layers; "
                "use one knot for a 1-layer model"
            )
        return [float(x) for x in np.round(np.linspace(knots[0], knots[1], n), 2)]
    if k == 3:
        if n < 3:
            raise UserError(
                f"a 3-knot (crown) profile {list(knots)} needs at least 3 layers, got {n}; "
                "use one or two knots"
            )
        start, peak, end = knots
        if n % 2 == 0:
            xp = [0, n / 2 - 1, n / 2, n - 1]
            fp = [start, peak, peak, end]
        else:
            xp = [0, (n + 1) / 2 - 1, n - 1]
            fp = [start, peak, end]
        return [float(x) for x in np.interp(np.arange(n), xp, fp)]
    if n < k:
        raise UserError(f"a {k}-knot profile needs at least {k} layers, got {n}")
    return [float(x) for x in np.interp(np.arange(n), np.linspace(0, n - 1, k), knots)]


def multipliers(profile: LWSConfig, n: int) -> tuple[list[float], list[float]]:
    """(beta, alpha) per layer: interpolated, then framed."""
    beta = interpolate(profile.ffn_knots, n)
    alpha = interpolate(profile.attn_knots, n)
    if profile.framed:
        beta[0] = beta[-1] = profile.frame_ffn
        alpha[0] = alpha[-1] = profile.frame_attn
    return beta, alpha


def head_group(profile: LWSConfig, tp: int) -> int:
    """Query heads must be a multiple of this (the GQA group, widened to TP when asked)."""
    if profile.gqa == "group_size":
        g = profile.kv_group_size
        return g * tp if profile.tp_aware_rounding else g
    g = profile.num_kv_heads
    return math.lcm(g, tp) if profile.tp_aware_rounding else g


def layer_shapes(profile: LWSConfig, dims: ModelConfig, tp: int = 1) -> list[LayerShape]:
    """The exact shape of every layer, validated against the tensor-parallel rule for `tp`."""
    _check_profile(profile, dims, tp)
    beta, alpha = multipliers(profile, dims.num_layers)
    group = head_group(profile, tp)
    shapes = []
    for i, (b, a) in enumerate(zip(beta, alpha)):
        ffn_width, q_width = b * dims.d_model, a * dims.d_model
        if not (0 < ffn_width < math.inf and 0 < q_width < math.inf):
            raise UserError(
                f"layer {i}: multipliers ffn={b:g}, attn={a:g} give a non-positive or "
                "non-finite size; all knots (and frame values) must be finite and > 0"
            )
        if q_width / dims.d_head < _group(profile):
            raise UserError(
                f"layer {i}: attn multiplier {a:g} gives {q_width / dims.d_head:g} query heads, "
                f"below one KV group of {_group(profile)}; raise lws.attn_knots or lower the group"
            )
        heads = make_divisible(q_width, group * dims.d_head) // dims.d_head
        kv = heads // profile.kv_group_size if profile.gqa == "group_size" else profile.num_kv_heads
        shapes.append(LayerShape(make_divisible(ffn_width, profile.ffn_multiple), heads, kv))
    check_tensor_parallel(shapes, tp)
    return shapes


def _group(profile: LWSConfig) -> int:
    return profile.kv_group_size if profile.gqa == "group_size" else profile.num_kv_heads


def _check_profile(profile: LWSConfig, dims: ModelConfig, tp: int) -> None:
    if _group(profile) < 1:
        key = "kv_group_size" if profile.gqa == "group_size" else "num_kv_heads"
        raise UserError(f"lws.{key}={_group(profile)}: must be at least 1")
    for key, value in (
        ("lws.ffn_multiple", profile.ffn_multiple),
        ("model.make_vocab_size_divisible_by", dims.make_vocab_size_divisible_by),
    ):
        if value < 1:
            raise UserError(f"{key}={value}: must be at least 1 (sizes are rounded to it)")
    if tp < 1:
        raise UserError(f"tensor-parallel size {tp}: must be at least 1")
    if dims.num_layers < 1:
        raise UserError(f"model.num_layers={dims.num_layers}: must be at least 1")
    if profile.tp_aware_rounding and profile.gqa == "fixed_kv" and profile.num_kv_heads % tp:
        raise UserError(
            f"lws.num_kv_heads={profile.num_kv_heads} is not divisible by TP={tp} "
            "(fixed_kv keeps it in every layer); choose a TP that divides it"
        )


def check_tensor_parallel(shapes: list[LayerShape], tp: int) -> None:
    """Megatron-Core's rule: every layer's query and KV heads divide evenly over TP ranks."""
    for i, s in enumerate(shapes):
        if s.num_query_heads % tp or s.num_kv_heads % tp:
            raise UserError(
                f"layer {i} has {s.num_query_heads} query / {s.num_kv_heads} KV heads, "
                f"not divisible by TP={tp}; use a TP that divides them or set "
                "lws.tp_aware_rounding=true"
            )


def tp_adjustments(profile: LWSConfig, dims: ModelConfig, tp: int) -> list[TPAdjustment]:
    """How far TP-aware rounding moved each layer's heads from the plain rounding."""
    if not profile.tp_aware_rounding or tp == 1:
        return []
    plain = layer_shapes(replace(profile, tp_aware_rounding=False), dims, 1)
    aware = layer_shapes(profile, dims, tp)
    return [
        TPAdjustment(i, p.num_query_heads, a.num_query_heads)
        for i, (p, a) in enumerate(zip(plain, aware))
        if p.num_query_heads != a.num_query_heads
    ]


def padded_vocab_size(dims: ModelConfig, tp: int = 1) -> int:
    """Megatron pads the vocabulary so that every TP rank holds an equal slice."""
    multiple = math.lcm(dims.make_vocab_size_divisible_by, tp)
    return -(-dims.vocab_size // multiple) * multiple


def layer_params(shape: LayerShape, dims: ModelConfig) -> int:
    """Trainable parameters of one SwiGLU transformer layer without biases (RMSNorm weights).

    Two d-wide norms either way (pre or post placement); QK-norm gains are one d_head-wide
    gain each for q and k (head), or one per q and k projection element (full).
    """
    d, h = dims.d_model, dims.d_head
    attn = d * h * (2 * shape.num_query_heads + 2 * shape.num_kv_heads)
    mlp = 3 * d * shape.ffn_hidden_size
    return attn + mlp + 2 * d + qk_norm_params(shape, dims)


def qk_norm_params(shape: LayerShape, dims: ModelConfig) -> int:
    """The QK-norm gains of one layer (`model.qk_norm`)."""
    if dims.qk_norm == "full":
        return dims.d_head * (shape.num_query_heads + shape.num_kv_heads)
    return 2 * dims.d_head if dims.qk_norm == "head" else 0


def layer_flops_per_token(shape: LayerShape, dims: ModelConfig) -> int:
    """Training FLOPs per token (forward + backward = 3x forward) of one layer.

    Matrix multiplies count 2 FLOPs per weight; causal attention counts half of the
    QK^T and AV products over the sequence, as flash attention computes them.
    """
    d, h = dims.d_model, dims.d_head
    matmul = 2 * (d * h * (2 * shape.num_query_heads + 2 * shape.num_kv_heads))
    matmul += 2 * 3 * d * shape.ffn_hidden_size
    attention = 2 * dims.seq_length * shape.num_query_heads * h
    return 3 * (matmul + attention)


@dataclass(frozen=True)
class ModelSummary:
    """Shared by every caller of `Config.summary` (cached), so its sequences are tuples."""

    layers: tuple[LayerShape, ...]
    layer_params: tuple[int, ...]
    layer_flops: tuple[int, ...]
    embedding_params: int
    output_params: int
    final_norm_params: int
    head_flops_per_token: int

    @property
    def total_params(self) -> int:
        """Trainable parameters of the model training builds (tied head counted once)."""
        return (
            sum(self.layer_params)
            + self.embedding_params
            + self.output_params
            + self.final_norm_params
        )

    @property
    def non_embedding_params(self) -> int:
        return self.total_params - self.embedding_params

    @property
    def flops_per_token(self) -> int:
        return sum(self.layer_flops) + self.head_flops_per_token


def summarize(profile: LWSConfig, dims: ModelConfig, tp: int = 1) -> ModelSummary:
    shapes = tuple(layer_shapes(profile, dims, tp))
    vocab = padded_vocab_size(dims, tp)
    embedding = vocab * dims.d_model
    return ModelSummary(
        layers=shapes,
        layer_params=tuple(layer_params(s, dims) for s in shapes),
        layer_flops=tuple(layer_flops_per_token(s, dims) for s in shapes),
        embedding_params=embedding,
        output_params=0 if dims.tie_embeddings else embedding,
        final_norm_params=dims.d_model,
        head_flops_per_token=3 * 2 * vocab * dims.d_model,
    )
