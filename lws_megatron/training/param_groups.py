"""AdamW parameter groups: weight decay everywhere except the configured exclusions."""

from __future__ import annotations

import torch


def exclusion_kind(name: str, param: torch.Tensor) -> str | None:
    """Which `optim.no_decay` category a Megatron parameter falls in, if any.

    A tied head on a later pipeline stage is Megatron's copy of the input embedding (it carries
    `shared_embedding`), so it is excluded with the embedding it mirrors; an untied head is not
    an embedding: the paper decays it.
    """
    if "embedding" in name or getattr(param, "shared_embedding", False):
        return "embeddings"
    if "output_layer" in name:
        return "output_head"
    if name.endswith(".bias"):
        return "biases"
    if "norm" in name or param.ndim == 1:
        return "norms"
    return None


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay: list[str]) -> list[dict]:
    decay, plain = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (plain if exclusion_kind(name, param) in no_decay else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups
