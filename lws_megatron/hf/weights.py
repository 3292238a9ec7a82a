"""A checkpoint's weights as one TP=1, PP=1 state dict, and under the LWS export's names.

Checkpoints are layout-free (`training/shards.py`): every weight is stored under Megatron's
global name (global layer numbers; a tied head as the embedding) and its global shape, whatever
TP and PP saved it, so reading one needs no process group and no knowledge of the layout. The
fused QKV projection is then unpacked from Megatron's per-group [q..., k, v] order.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lws_megatron.config import Config
from lws_megatron.errors import UserError


def megatron_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights under Megatron's TP=1, PP=1 names, from a checkpoint dir."""
    from lws_megatron.training.checkpoint import read_full

    state = read_full(checkpoint)
    if not state:
        raise UserError(f"{checkpoint} holds no model weights; export another step with --step")
    return state


def hf_state(state: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """Megatron's TP=1 state dict under the export's names, cut to the tokenizer's vocabulary."""
    m, vocab = config.model, config.model.vocab_size
    layers = config.summary().layers
    out = {
        "model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:vocab],
        "model.norm.weight": state["decoder.final_layernorm.weight"],
    }
    if not m.tie_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"][:vocab]
    # Megatron's layer norms (local spec, and TE's norms fused into the next linear) -> ours.
    norms = (
        {
            "post_attention_layernorm.weight": "post_attention_norm",
            "post_mlp_layernorm.weight": "post_mlp_norm",
        }
        if m.norm_placement == "post"
        else {
            "input_layernorm.weight": "input_norm",
            "self_attention.linear_qkv.layer_norm_weight": "input_norm",
            "pre_mlp_layernorm.weight": "pre_mlp_norm",
            "mlp.linear_fc1.layer_norm_weight": "pre_mlp_norm",
        }
    )
    for i, shape in enumerate(layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        groups = shape.num_kv_heads
        per_group = shape.num_query_heads // groups
        qkv = state[src + "self_attention.linear_qkv.weight"]
        qkv = qkv.view(groups, per_group + 2, m.d_head, m.d_model)
        out[dst + "self_attn.q_proj.weight"] = qkv[:, :per_group].reshape(-1, m.d_model)
        out[dst + "self_attn.k_proj.weight"] = qkv[:, per_group].reshape(-1, m.d_model)
        out[dst + "self_attn.v_proj.weight"] = qkv[:, per_group + 1].reshape(-1, m.d_model)
        out[dst + "self_attn.o_proj.weight"] = state[src + "self_attention.linear_proj.weight"]
        gate, up = state[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
        out[dst + "mlp.down_proj.weight"] = state[src + "mlp.linear_fc2.weight"]
        if m.qk_norm != "none":
            for qk in ("q", "k"):
                weight = state[src + f"self_attention.{qk}_layernorm.weight"]
                heads = shape.num_query_heads if qk == "q" else groups
                full = m.qk_norm == "full"
                out[dst + f"self_attn.{qk}_norm.weight"] = (
                    weight.view(heads, m.d_head) if full else weight
                )
        for megatron, ours in norms.items():
            if src + megatron in state:
                out[dst + ours + ".weight"] = state[src + megatron]
    return {k: v.contiguous() for k, v in out.items()}
