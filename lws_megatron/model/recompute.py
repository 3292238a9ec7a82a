"""Activation recomputation per layer (`parallel.recompute`), on Megatron-Core's own machinery.

- selective: Megatron's TransformerLayer recomputes its MLP in backward (`recompute_modules`)
  when its own config says `recompute_granularity="selective"`;
  `LWSTransformerConfig.get_config_for_layer` says so for the chosen layers only.
- full: Megatron recomputes whole layers in its TransformerBlock, but only all of a chunk's
  layers or its first N (`recompute_method`), while in an LWS model the layers worth recomputing
  are the widest, wherever they sit. `RecomputableLayer` runs each chosen layer under Megatron's
  `tensor_parallel.checkpoint`, as the block's recompute would: the layer keeps only its input,
  and backward runs its forward again under the first forward's RNG states.

Compiled (`train.compile`), both run as torch's own checkpoint instead (`trace_checkpoints`).
"""

from __future__ import annotations

import torch
import torch._dynamo
import torch.utils.checkpoint
from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

# What `recompute: selective` recomputes: the SwiGLU MLP, whose FC1 output and activation are
# the widest tensors of an LWS layer; its input stays saved. Not the core attention: SDPA's and
# TE's fused kernels keep only q, k, v and the output, which the layer keeps anyway, so
# recomputing it would buy a log-sum-exp per head for the attention's forward again.
SELECTIVE_MODULES = ("mlp",)


def layer_recompute(config: TransformerConfig, layer_number: int) -> dict:
    """The per-layer TransformerConfig fields that selective recomputation of global layer
    `layer_number` (1-based) sets; Megatron's layer reads them from its own config."""
    chosen = layer_number - 1 in config.recomputed_layers
    if config.recompute == "selective" and chosen:
        return {"recompute_granularity": "selective", "recompute_modules": list(SELECTIVE_MODULES)}
    return {"recompute_granularity": None, "recompute_modules": None}


class RecomputableLayer(TransformerLayer):
    """Megatron's TransformerLayer, run under `tensor_parallel.checkpoint` in training when
    its config chose it for full recomputation.

    The checkpoint wraps the module call, so a layer compiled alone (`train.compile=layers`)
    is one compiled graph run inside the checkpoint, twice.
    """

    def __init__(self, config: TransformerConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.recompute_whole = (
            config.recompute == "full" and self.layer_number - 1 in config.recomputed_layers
        )

    def __call__(self, *args, **kwargs):
        if not (self.recompute_whole and self.training and torch.is_grad_enabled()):
            return super().__call__(*args, **kwargs)
        names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        others = {k: v for k, v in kwargs.items() if k not in names}
        call, count = super().__call__, len(args)

        def run(*tensors):
            return call(*tensors[:count], **others, **dict(zip(names, tensors[count:])))

        return tensor_parallel.checkpoint(run, False, *args, *(kwargs[n] for n in names))


def trace_checkpoints() -> None:
    """Make the recomputation above traceable by torch.compile.

    Megatron's `tensor_parallel.checkpoint` saves and restores the RNG states on the host, which
    Dynamo cannot trace: a graph break at every recomputed layer, three at every selectively
    recomputed MLP. While Dynamo traces, the same call runs as torch's non-reentrant checkpoint,
    which it records in the graph and whose region AOTAutograd recomputes in backward; eager
    calls stay Megatron's. Nothing random is replayed either way: the model has no dropout.

    Megatron-Core 0.19's layer sets and clears an attribute of its own in forward (the manager
    of its activation offloading, which we leave off); Dynamo breaks the graph at such a side
    effect in a checkpoint unless told not to replay it when backward recomputes the forward,
    which is harmless here: the forward leaves the attribute as it found it.
    """
    megatron_checkpoint = tensor_parallel.checkpoint
    if getattr(megatron_checkpoint, "traceable", False):
        return
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True

    def checkpoint(function, distribute_saved_activations, *args):
        if torch.compiler.is_compiling() and not distribute_saved_activations:
            return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
        return megatron_checkpoint(function, distribute_saved_activations, *args)

    checkpoint.traceable = True
    tensor_parallel.checkpoint = checkpoint
