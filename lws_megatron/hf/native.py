"""Isotropic runs as the stock Hugging Face architecture they equal, loadable without remote code.

A run whose layers all have one FFN width and one head count is a stock decoder when its block
is one: OLMo-2's (post-norm, QK-norm over the whole projection) is `Olmo2ForCausalLM`, pre-norm
with a per-head QK-norm is `Qwen3ForCausalLM`, pre-norm without QK-norm is `LlamaForCausalLM`.
All three share what the LWS block fixes: RMSNorm with gain, RoPE on the whole head with the
halves rotated, SwiGLU, no biases, GQA. Other runs keep the shipped LWS code.
"""

from __future__ import annotations

from typing import Any

from lws_megatron.config import Config, ModelConfig

# (norm_placement, qk_norm) -> (architecture, model_type)
ARCHITECTURES = {
    ("post", "full"): ("Olmo2ForCausalLM", "olmo2"),
    ("pre", "head"): ("Qwen3ForCausalLM", "qwen3"),
    ("pre", "none"): ("LlamaForCausalLM", "llama"),
}
NATIVE_CLASSES = tuple(arch for arch, _ in ARCHITECTURES.values())


def native_architecture(config: Config) -> str | None:
    """The stock architecture the run's model equals, or None (an LWS model)."""
    shapes = {
        (s.ffn_hidden_size, s.num_query_heads, s.num_kv_heads) for s in config.summary().layers
    }
    if len(shapes) != 1:
        return None
    found = ARCHITECTURES.get((config.model.norm_placement, config.model.qk_norm))
    return found[0] if found else None


def native_config(config: Config, tokenizer_ids: dict[str, int | None]) -> dict[str, Any]:
    """The stock config.json of an isotropic run, built and checked by transformers' class."""
    import transformers

    m = config.model
    arch = native_architecture(config)
    layer = config.summary().layers[0]
    fields = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.d_model,
        intermediate_size=layer.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=layer.num_query_heads,
        num_key_value_heads=layer.num_kv_heads,
        head_dim=m.d_head,
        hidden_act="silu",
        max_position_embeddings=m.seq_length,
        rms_norm_eps=m.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        tie_word_embeddings=m.tie_embeddings,
        attention_bias=False,
        **tokenizer_ids,
    )
    cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    out = cls(**fields).to_dict()
    out.update(architectures=[arch], dtype="float32")
    return out


def native_state(state: dict, m: ModelConfig) -> dict:
    """The LWS export's weights (`weights.hf_state`) under the stock architecture's names."""
    post = m.norm_placement == "post"
    norms = (
        {
            "post_attention_norm": "post_attention_layernorm",
            "post_mlp_norm": "post_feedforward_layernorm",
        }
        if post
        else {"input_norm": "input_layernorm", "pre_mlp_norm": "post_attention_layernorm"}
    )
    out = {}
    for name, tensor in state.items():
        prefix, _, leaf = name.rpartition(".")
        head, _, module = prefix.rpartition(".")
        if module in norms:
            name = f"{head}.{norms[module]}.{leaf}"
        elif module in ("q_norm", "k_norm") and m.qk_norm == "full":
            tensor = tensor.reshape(-1)  # OLMo-2 norms the [heads x d_head] projection flat
        out[name] = tensor
    return out
