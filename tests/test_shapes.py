"""The shape engine against LWS_SPEC.md, at its edges."""

from dataclasses import replace

import numpy as np
import pytest

from lws_megatron import shapes
from lws_megatron.config import LWSConfig, ModelConfig
from lws_megatron.errors import UserError
from lws_megatron.shapes import LayerShape, make_divisible

PAPER = ModelConfig(num_layers=18, d_model=768, d_head=64, vocab_size=50280, seq_length=1024)


def paper_profile(ffn, attn, framed=False, **kw):
    return LWSConfig(ffn_knots=tuple(ffn), attn_knots=tuple(attn), framed=framed, **kw)


def test_make_divisible_rules():
    assert make_divisible(100, 256) == 256  # below one multiple: the multiple
    assert make_divisible(768, 256) == 768
    assert make_divisible(906.24, 256) == 1024  # nearest
    assert make_divisible(280, 256) == 256  # down by 8.6%: allowed
    assert make_divisible(383.9, 256) == 512  # 256 would be 33% down
    # Rounding down by more than 10% is not allowed: 284.45 -> 256 would lose 10.0002%.
    assert make_divisible(284.44, 256) == 256
    assert make_divisible(284.45, 256) == 512


def test_vanilla_18l_matches_the_spec_exactly():
    s = shapes.summarize(paper_profile([1.0, 4.0], [0.5, 1.0]), PAPER)
    assert [row.ffn_hidden_size for row in s.layers] == [
        768,
        1024,
        1024,
        1280,
        1280,
        1536,
        1536,
        1792,
        1792,
        2048,
        2048,
        2304,
        2304,
        2560,
        2560,
        2816,
        2816,
        3072,
    ]
    assert [row.num_query_heads for row in s.layers] == [6, 6] + [9] * 10 + [12] * 6
    assert [row.num_kv_heads for row in s.layers] == [2, 2] + [3] * 10 + [4] * 6
    assert round(s.total_params / 1e6, 1) == 179.7
    assert shapes.padded_vocab_size(PAPER) == 50304


def test_two_knots_are_numpy_linspace_rounded_to_two_decimals():
    got = shapes.interpolate((0.5, 1.0), 18)
    assert got == list(np.round(np.linspace(0.5, 1.0, 18), 2))
    assert got[1] == 0.53  # 0.5294... rounded
    assert shapes.interpolate((1.0, 4.0), 2) == [1.0, 4.0]


def test_crown_even_depth_has_a_two_layer_plateau_and_is_not_rounded():
    m = shapes.interpolate((0.5, 3.8, 0.5), 18)
    assert m[8] == m[9] == 3.8
    assert m.count(3.8) == 2
    assert m[1] == pytest.approx(0.5 + 3.3 / 8)  # unrounded: 0.9125
    assert m[0] == m[17] == 0.5


def test_crown_odd_depth_peaks_in_one_middle_layer():
    m = shapes.interpolate((1.0, 3.0, 1.0), 5)
    assert m == [1.0, 2.0, 3.0, 2.0, 1.0]


def test_more_knots_are_piecewise_linear_over_even_x_knots():
    m = shapes.interpolate((1.0, 2.0, 2.0, 1.0), 7)
    assert m == pytest.approx([1.0, 1.5, 2.0, 2.0, 2.0, 1.5, 1.0])


def test_depth_one_and_constant_profiles():
    assert shapes.interpolate((2.5,), 1) == [2.5]
    assert shapes.interpolate((2.5, 2.5), 1) == [2.5]
    assert shapes.interpolate((2.5,), 4) == [2.5] * 4
    with pytest.raises(UserError, match="at least 2 layers"):
        shapes.interpolate((1.0, 4.0), 1)
    with pytest.raises(UserError, match="at least 3 layers"):
        shapes.interpolate((0.5, 3.8, 0.5), 2)


def test_frame_overwrites_ends_and_keeps_interior_from_n_point_interpolation():
    plain, _ = shapes.multipliers(paper_profile([0.5, 4.0], [0.5, 1.0]), 18)
    framed, alpha = shapes.multipliers(paper_profile([0.5, 4.0], [0.5, 1.0], framed=True), 18)
    assert framed[0] == framed[-1] == 4.0 and alpha[0] == alpha[-1] == 1.0
    assert framed[1:-1] == plain[1:-1]


def test_group_size_convention_varies_kv_heads():
    layers = shapes.layer_shapes(paper_profile([1.0, 4.0], [0.5, 1.0]), PAPER)
    assert all(row.num_query_heads == 3 * row.num_kv_heads for row in layers)


def test_fixed_kv_convention_keeps_kv_and_rounds_queries_to_its_multiple():
    profile = paper_profile([1.0, 4.0], [0.5, 1.0], gqa="fixed_kv", num_kv_heads=4)
    layers = shapes.layer_shapes(profile, PAPER)
    assert {row.num_kv_heads for row in layers} == {4}
    assert all(row.num_query_heads % 4 == 0 for row in layers)
    assert layers[0].num_query_heads == 8  # 384 / 64 = 6 heads, nearest multiple of 4 is 8
    assert layers[-1].num_query_heads == 12


def test_tp_rule_names_the_layer_and_tp_aware_rounding_fixes_it():
    crown = paper_profile([0.5, 3.8, 0.5], [0.5, 1.0, 0.5], framed=True)
    with pytest.raises(UserError, match=r"layer 1 has 9 query / 3 KV heads, not divisible by TP=2"):
        shapes.layer_shapes(crown, PAPER, tp=2)
    aware = paper_profile([0.5, 3.8, 0.5], [0.5, 1.0, 0.5], framed=True, tp_aware_rounding=True)
    layers = shapes.layer_shapes(aware, PAPER, tp=2)
    assert all(row.num_query_heads % 2 == 0 and row.num_kv_heads % 2 == 0 for row in layers)
    moved = shapes.tp_adjustments(aware, PAPER, 2)
    assert [(a.layer, a.heads_before, a.heads_after) for a in moved][0] == (1, 9, 12)
    assert all(a.heads_after % 6 == 0 for a in moved)
    assert shapes.layer_shapes(aware, PAPER, tp=1) == shapes.layer_shapes(crown, PAPER, tp=1)


def test_tp_aware_fixed_kv_needs_tp_to_divide_kv_heads():
    profile = paper_profile([2.0], [1.0], gqa="fixed_kv", num_kv_heads=3, tp_aware_rounding=True)
    with pytest.raises(UserError, match="num_kv_heads=3 is not divisible by TP=2"):
        shapes.layer_shapes(profile, PAPER, tp=2)


def test_non_positive_sizes_and_too_few_heads_are_refused_naming_the_layer():
    with pytest.raises(UserError, match="layer 0: .*non-positive"):
        shapes.layer_shapes(paper_profile([0.0, 4.0], [0.5, 1.0]), PAPER)
    with pytest.raises(UserError, match="layer 0: attn multiplier 0.1 gives 1.2 query heads"):
        shapes.layer_shapes(paper_profile([1.0, 4.0], [0.1, 1.0]), PAPER)


def test_layer_params_count_every_weight():
    dims = ModelConfig(num_layers=1, d_model=8, d_head=2, vocab_size=10, seq_length=4)
    layer = LayerShape(ffn_hidden_size=16, num_query_heads=4, num_kv_heads=2)
    qkv = 8 * (4 + 2 + 2) * 2
    proj = 4 * 2 * 8
    mlp = 8 * 16 * 2 + 16 * 8
    norms = 8 + 8 + 2 + 2
    assert shapes.layer_params(layer, dims) == qkv + proj + mlp + norms


def test_totals_count_the_head_once_when_tied():
    profile = paper_profile([4.0], [1.0])
    untied = shapes.summarize(profile, PAPER)
    tied = shapes.summarize(profile, replace(PAPER, tie_embeddings=True))
    assert untied.total_params - tied.total_params == 50304 * 768
    assert tied.non_embedding_params == sum(tied.layer_params) + 768


def test_flops_per_token_are_three_times_forward_with_causal_attention():
    dims = ModelConfig(num_layers=1, d_model=8, d_head=2, vocab_size=10, seq_length=4)
    layer = LayerShape(ffn_hidden_size=16, num_query_heads=4, num_kv_heads=2)
    forward_matmul = 2 * (8 * 2 * (2 * 4 + 2 * 2) + 3 * 8 * 16)
    forward_attention = 2 * 4 * 4 * 2  # half of (QK + AV) = 2 * seq * heads * d_head
    assert shapes.layer_flops_per_token(layer, dims) == 3 * (forward_matmul + forward_attention)
