"""Native exports without training: an isotropic model written as the stock architecture its
block equals computes what the shipped LWS code computes (logits, every hidden state, every
attention map), and only those runs are native."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import transformers

from lws_megatron.config import load_config
from lws_megatron.export import lws_config
from lws_megatron.hf.configuration_lws import LWSConfig
from lws_megatron.hf.modeling_lws import LWSForCausalLM
from lws_megatron.hf.native import native_architecture, native_config, native_state
from tests.helpers import TINY

ISOTROPIC = [
    "lws.ffn_knots=[3.0]",
    "lws.attn_knots=[1.0]",
    "lws.gqa=fixed_kv",
    "lws.num_kv_heads=2",
]
BLOCKS = {
    "Olmo2ForCausalLM": ["model.norm_placement=post", "model.qk_norm=full"],
    "Qwen3ForCausalLM": ["model.qk_norm=head", "model.tie_embeddings=true"],
    "LlamaForCausalLM": ["model.qk_norm=none"],
}
IDS = {"eos_token_id": 1, "pad_token_id": 0, "bos_token_id": 2}


def models(arch: str):
    """(LWS model with random weights, the native model given the same weights)."""
    config = load_config(TINY, [*ISOTROPIC, *BLOCKS[arch], "model.rope_theta=10000.0"])
    assert native_architecture(config) == arch
    torch.manual_seed(0)
    lws = LWSForCausalLM(LWSConfig(**lws_config(config, IDS))).eval()
    for name, param in lws.named_parameters():
        if name.endswith("norm.weight"):  # gains away from 1, so a misplaced norm shows
            param.data.uniform_(0.5, 1.5)
    hf = native_config(config, IDS)
    cls = getattr(transformers, arch)
    native = cls._from_config(cls.config_class.from_dict(hf), attn_implementation="eager").eval()
    native.load_state_dict(native_state(lws.state_dict(), config.model))
    return lws, native


@pytest.mark.parametrize("arch", sorted(BLOCKS))
def test_native_model_computes_the_lws_model(arch):
    lws, native = models(arch)
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = lws(tokens, output_hidden_states=True, output_attentions=True)
        theirs = native(tokens, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-5)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 5
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert len(ours.attentions) == len(theirs.attentions) == 4
    for a, b in zip(ours.attentions, theirs.attentions):
        assert a.shape == (2, 4, 24, 24)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_lws_attentions_follow_the_cache():
    lws, _ = models("LlamaForCausalLM")
    tokens = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = lws(tokens, output_attentions=True).attentions
        cache = transformers.DynamicCache()
        lws(tokens[:, :6], cache=cache, use_cache=True)
        step = lws(tokens[:, 6:], cache=cache, use_cache=True, output_attentions=True).attentions
    for a, b in zip(full, step):
        torch.testing.assert_close(a[:, :, 6:], b, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # the LWS profile: layers differ
        [*ISOTROPIC, "model.norm_placement=post", "model.qk_norm=head"],  # no stock block
        [*ISOTROPIC, "model.qk_norm=full"],
    ],
)
def test_other_runs_stay_lws(overrides):
    assert native_architecture(load_config(TINY, overrides)) is None
