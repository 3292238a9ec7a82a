"""The config of an exported LWS model: one entry per layer for the sizes that differ."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class LWSConfig(PreTrainedConfig):
    """Every block option the Megatron model was built with, so that the export computes the
    same function: norm placement (pre: Llama, post: OLMo-2), QK-norm kind (none; head: one gain
    over d_head shared by the heads; full: one norm over the whole projection), RoPE base, eps."""

    model_type = "lws"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 512
    hidden_size: int = 64
    head_dim: int = 16
    intermediate_sizes: list[int] | None = None
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    norm_placement: str = "pre"
    qk_norm: str = "head"
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 1024
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        self.intermediate_sizes = list(self.intermediate_sizes or [4 * self.hidden_size])
        heads = self.hidden_size // self.head_dim
        self.layer_num_attention_heads = list(self.layer_num_attention_heads or [heads])
        self.layer_num_key_value_heads = list(
            self.layer_num_key_value_heads or self.layer_num_attention_heads
        )
        self.num_hidden_layers = len(self.intermediate_sizes)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        counts = {len(self.layer_num_attention_heads), len(self.layer_num_key_value_heads)}
        if counts != {self.num_hidden_layers}:
            raise ValueError(
                "intermediate_sizes, layer_num_attention_heads and "
                "layer_num_key_value_heads need one entry per layer"
            )
        if self.norm_placement not in ("pre", "post") or self.qk_norm not in (
            "none",
            "head",
            "full",
        ):
            raise ValueError(
                f"norm_placement={self.norm_placement!r} (pre|post), "
                f"qk_norm={self.qk_norm!r} (none|head|full)"
            )
