"""Checks on a batch before any compute: the mistakes that otherwise fail deep inside a kernel."""

from __future__ import annotations

import torch

from lws_megatron.errors import UserError


def check_batch(
    tokens: torch.Tensor, vocab_size: int, seq_length: int, labels: torch.Tensor | None = None
) -> None:
    """Refuse token ids outside the vocabulary and sequences longer than the model's.

    Megatron would index past the embedding (a crash or silent garbage on GPU) or run RoPE past
    the length the model is configured and planned for.
    """
    for name, ids in (("tokens", tokens), ("labels", labels)):
        if ids is None:
            continue
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise UserError(
                f"batch {name}: expected integer ids of shape [batch, sequence], got "
                f"{ids.dtype} of shape {list(ids.shape)}"
            )
        seq, limit = ids.shape[1], seq_length
        if seq > limit:
            raise UserError(
                f"batch {name}: a sequence of {seq} tokens is longer than model.seq_length="
                f"{limit}; cut the data into sequences of at most {limit} or raise model.seq_length"
            )
        if ids.numel() == 0:
            continue
        low, high, vocab = int(ids.min()), int(ids.max()), vocab_size
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise UserError(
                f"batch {name}: token id {bad} is outside the vocabulary of model.vocab_size="
                f"{vocab}; set model.vocab_size to the tokenizer's size or re-tokenize the data"
            )
