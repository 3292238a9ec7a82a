"""The export's reading of a layout, without training: TP shards merge back into the tensor
they were cut from (Megatron's strided split, as `build.init_weights` cuts it), and pipeline
chunks get their global layer numbers (even, uneven and virtual-pipeline layouts)."""

from __future__ import annotations

import pytest
import torch

from lws_megatron.hf.weights import _SPLIT, _merge, _stage_offsets


@pytest.mark.parametrize("name", sorted(_SPLIT))
@pytest.mark.parametrize("tp", [2, 4])
def test_shards_merge_into_the_full_tensor(name, tp):
    dim, stride = _SPLIT[name]
    full = torch.randn(16, 8) if dim == 0 else torch.randn(8, 16)
    chunks = full.chunk(tp * stride, dim=dim)
    shards = [torch.cat(chunks[rank::tp], dim=dim) for rank in range(tp)]
    assert torch.equal(_merge(f"decoder.layers.0.x.{name}", shards, _SPLIT), full)


def test_swiglu_merge_keeps_gate_rows_before_up_rows():
    gate, up = torch.arange(8.0).view(4, 2), 100 + torch.arange(8.0).view(4, 2)
    shards = [torch.cat([gate[:2], up[:2]]), torch.cat([gate[2:], up[2:]])]  # [gate_r; up_r]
    merged = _merge("mlp.linear_fc1.weight", shards, _SPLIT)
    assert torch.equal(merged, torch.cat([gate, up]))


def test_replicated_parameters_are_taken_once():
    norm = torch.ones(8)
    assert _merge("decoder.final_layernorm.weight", [norm, norm.clone()], _SPLIT) is norm


@pytest.mark.parametrize(
    "layout,pp,want",
    [
        (None, 2, {(0, 0): 0, (1, 0): 2}),
        ("Et|t*3L", 2, {(0, 0): 0, (1, 0): 1}),
        ("Et|t|t|tL", 2, {(0, 0): 0, (1, 0): 1, (0, 1): 2, (1, 1): 3}),
        ("Et*4|L", 2, {(0, 0): 0, (1, 0): 4}),
    ],
)
def test_pipeline_chunks_get_their_global_layer_numbers(layout, pp, want):
    assert _stage_offsets(4, pp, layout) == want
