"""The LWS layer spec: Megatron-Core's GPT layer, sized per layer by the shape engine.

Megatron's `TransformerBlock` builds layer `n` (global, 1-based, pipeline offset included) from
`config.get_config_for_layer(n)` when `heterogeneous_block_specs` is set. `LWSTransformerConfig`
answers with that layer's FFN width, query heads and KV heads, so every pipeline stage builds its
own layers at their own sizes, and Megatron's tensor and pipeline parallelism apply unchanged.
The same per-layer config carries each layer's recomputation (`recompute.py`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from lws_megatron.errors import UserError
from lws_megatron.model.attention import SDPAttention
from lws_megatron.model.compat import with_submodules
from lws_megatron.model.norm import RMSNorm
from lws_megatron.model.olmo import full_qk_norm_specs, post_norm_spec
from lws_megatron.model.recompute import RecomputableLayer, layer_recompute
from lws_megatron.shapes import LayerShape

Backend = Literal["sdpa", "te"]


@dataclass
class LWSTransformerConfig(TransformerConfig):
    """A TransformerConfig whose layers differ in FFN width and head counts."""

    layer_shapes: tuple[LayerShape, ...] = ()
    sdpa_kernel: str = "auto"  # model.sdpa_kernel, read by SDPAttention
    init: str = "megatron"  # model.init, read by build.init_weights
    recompute: str = "none"  # parallel.recompute: none | selective | full (recompute.py)
    recomputed_layers: tuple[int, ...] = ()  # the layers it applies to, 0-based global numbers

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.layer_shapes) != self.num_layers:
            raise ValueError(
                f"layer_shapes has {len(self.layer_shapes)} entries for {self.num_layers} layers"
            )
        self.heterogeneous_block_specs = True

    def get_config_for_layer(self, layer_number: int) -> TransformerConfig:
        """The config of global layer `layer_number` (1-based), as TransformerBlock asks for it."""
        shape = self.layer_shapes[layer_number - 1]
        return dataclasses.replace(
            self,
            ffn_hidden_size=shape.ffn_hidden_size,
            num_attention_heads=shape.num_query_heads,
            num_query_groups=shape.num_kv_heads,
            **layer_recompute(self, layer_number),
        )


class GroupedRowParallelLinear(RowParallelLinear):
    """RowParallelLinear that hands its own TP group to the matmul.

    Megatron-Core 0.16-0.19's forward passes `tp_group=None`, so rank 0 issues a deprecation warning
    on every call; to torch.compile each warning is a graph break, and a compiled layer ran as
    nine graphs instead of one.
    """

    def _forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("tp_group") is None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


def transformer_engine_usable() -> bool:
    """Transformer Engine needs its package and a CUDA device."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def resolve_backend(requested: str, device: torch.device) -> Backend:
    """`model.attention_backend`: auto picks TE where it can run, else SDPA."""
    if requested == "sdpa":
        return "sdpa"
    te_ok = device.type == "cuda" and transformer_engine_usable()
    if requested == "te":
        if not te_ok:
            raise UserError(
                "model.attention_backend=te needs Transformer Engine and a CUDA device; "
                "install transformer_engine on a GPU machine or set model.attention_backend=sdpa"
            )
        return "te"
    if requested != "auto":
        raise UserError(
            f"model.attention_backend={requested!r}: choose one of 'auto', 'sdpa', 'te'"
        )
    return "te" if te_ok else "sdpa"


def layer_spec(
    backend: Backend, *, qk_norm: str = "head", norm_placement: str = "pre"
) -> ModuleSpec:
    """Megatron's GPT layer spec with RMSNorm, SDPA or TE attention, and the block's choices:
    `model.qk_norm` (none | head | full) and `model.norm_placement` (pre | post, olmo.py).

    SwiGLU without biases and RoPE are settings of the TransformerConfig and GPTModel
    (build.py); the spec only chooses the modules. The norms of the SDPA spec are ours
    (norm.py), so that sequence parallelism can split them.
    """
    if backend == "te":
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_norm == "head")
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=qk_norm == "head", normalization="RMSNorm")
        layer = spec.submodules
        layer.input_layernorm = layer.pre_mlp_layernorm = RMSNorm
        head_norms = {"q_layernorm": RMSNorm, "k_layernorm": RMSNorm} if qk_norm == "head" else {}
        layer.self_attention = with_submodules(
            layer.self_attention,
            core_attention=SDPAttention,
            linear_proj=GroupedRowParallelLinear,
            **head_norms,
        )
        layer.mlp = with_submodules(layer.mlp, linear_fc2=GroupedRowParallelLinear)
    spec = dataclasses.replace(spec, module=RecomputableLayer)
    if qk_norm == "full":
        q_norm, k_norm = full_qk_norm_specs()
        spec.submodules.self_attention = with_submodules(
            spec.submodules.self_attention, q_layernorm=q_norm, k_layernorm=k_norm
        )
    if norm_placement == "pre":
        return spec
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm

        return post_norm_spec(spec, TENorm, unfused_linear=TEColumnParallelLinear)
    return post_norm_spec(spec, RMSNorm)


def block_spec(backend: Backend, model, num_layers: int) -> TransformerBlockSubmodules:
    """A chunk of `num_layers` layers of `model`'s (its ModelConfig) block, and its final norm.

    Given a layer spec alone, Megatron picks the final norm by what is importable (TE's, Apex's,
    else torch's, which refuses sequence parallelism); here it follows the backend.
    """
    layer = layer_spec(backend, qk_norm=model.qk_norm, norm_placement=model.norm_placement)
    norm = RMSNorm
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm as norm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=norm)
