"""The shipped modeling code on its own (random weights, no training): a KV cache and left
padding change nothing about the logits of the real tokens."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers.cache_utils import DynamicCache

from lws_megatron.hf.configuration_lws import LWSConfig
from lws_megatron.hf.modeling_lws import LWSForCausalLM


@pytest.fixture(params=[("pre", "head"), ("post", "full"), ("pre", "none")])
def model(request):
    torch.manual_seed(0)
    config = LWSConfig(
        vocab_size=64,
        hidden_size=32,
        head_dim=8,
        intermediate_sizes=[32, 96],
        layer_num_attention_heads=[2, 4],
        layer_num_key_value_heads=[2, 2],
        norm_placement=request.param[0],
        qk_norm=request.param[1],
        rope_theta=10000.0,
        pad_token_id=0,
    )
    return LWSForCausalLM(config).eval()


def test_cached_steps_give_the_full_forward_logits(model):
    tokens = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens).logits
        cache = DynamicCache()
        first = model(tokens[:, :6], cache=cache, use_cache=True).logits
        rest = [
            model(tokens[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(6, 10)
        ]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, rtol=0, atol=1e-5)


def test_left_padding_leaves_the_real_tokens_alone(model):
    tokens = torch.randint(1, 64, (1, 7), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), tokens], dim=1)
    mask = torch.cat(
        [torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1
    )
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(tokens).logits
        batched = model(padded, attention_mask=mask, position_ids=positions).logits[:, 3:]
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
