"""Core attention on PyTorch's `scaled_dot_product_attention`: causal, grouped-query, TP-aware.

Megatron's local `DotProductAttention` needs CUDA and materialises the [s, s] score matrix;
this module runs wherever PyTorch does. The causal mask is implied (`is_causal=True`, no mask
tensor) and q, k, v are [b, h, s, d] views whose last dimension is contiguous, as the fused
kernels need. `model.sdpa_kernel` pins one of PyTorch's kernels (auto: PyTorch's own order,
flash first); torch.compile traces the choice into the graph.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.nn.attention import SDPBackend, sdpa_kernel

from lws_megatron.errors import UserError

KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
CUDA_ONLY = ("cudnn", "efficient")


def attend(q, k, v, *, kernel: str, dropout: float = 0.0, scale: Optional[float] = None):
    """Causal SDPA over [b, heads, s, d] q and [b, kv_heads, s, d] k, v on `kernel`."""
    if kernel == "math":
        # Inductor (torch 2.13) fails to lower the math kernel on permuted views when the head
        # counts are equal; math materialises the scores anyway, so the copies cost nothing.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    with contextlib.nullcontext() if kernel == "auto" else sdpa_kernel(KERNELS[kernel]):
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=dropout,
            is_causal=True,
            scale=scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )


def check_kernel(
    kernel: str,
    heads: set[tuple[int, int]],
    head_dim: int,
    seq_length: int,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Refuse a pinned kernel that cannot run these (query heads, KV heads) at this dtype,
    before training: PyTorch would only fail at the first forward, with a list of warnings.
    The probe has the model's sequence length and SDPAttention's strides."""
    if kernel == "auto" or device.type == "meta":
        return
    if kernel in CUDA_ONLY and device.type != "cuda":
        raise UserError(
            f"model.sdpa_kernel={kernel} needs a CUDA device; use auto, flash or math here"
        )
    for num_heads, num_kv in sorted(heads):
        q, kv = (
            torch.zeros(seq_length, 1, h, head_dim, device=device, dtype=dtype, requires_grad=True)
            for h in (num_heads, num_kv)
        )
        try:
            attend(*(t.permute(1, 2, 0, 3) for t in (q, kv, kv)), kernel=kernel).sum().backward()
        except RuntimeError as err:
            raise UserError(
                f"model.sdpa_kernel={kernel} cannot run attention with {num_heads} query and "
                f"{num_kv} KV heads of size {head_dim} in {str(dtype).removeprefix('torch.')} "
                f"on {device.type} ({str(err).splitlines()[0]}); use model.sdpa_kernel=auto"
            ) from None


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
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.kernel = getattr(config, "sdpa_kernel", "auto")  # LWSTransformerConfig's field

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
        out = attend(
            q,
            k,
            v,
            kernel=self.kernel,
            dropout=self.dropout if self.training else 0.0,
            scale=self.softmax_scale,
        )
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)
