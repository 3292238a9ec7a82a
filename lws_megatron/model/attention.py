"""Core attention on PyTorch's `scaled_dot_product_attention`: causal, grouped-query, TP-aware.

Megatron's local `DotProductAttention` needs CUDA and materialises the [s, s] score matrix;
this module runs wherever PyTorch does. On a GPU, SDPA picks the flash kernel: the causal mask
is implied (`is_causal=True`, no mask tensor) and q, k, v are [b, h, s, d] views whose last
dimension is contiguous, as flash attention needs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Drop-in `core_attention` for Megatron's `SelfAttention` (same constructor and call)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPAttention is causal only, got attn_mask_type={attn_mask_type}")
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism; use the TE spec")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_kv_heads = divide(config.num_query_groups, tp)
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        """[s, b, heads, d] query and [s, b, kv_heads, d] key/value -> [s, b, heads * d].

        Like TE's causal attention, `attention_mask` is not read: the mask type is causal.
        """
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("SDPAttention takes no attention_bias or packed sequences")
        seq, batch = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
            scale=self.softmax_scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)
