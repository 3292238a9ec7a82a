"""The LWS model on Megatron-Core: GPTModel with per-layer sizes, TP and PP on CPU and GPU.

The model package builds modules from `ModelArgs` (model section, layer shapes, TP, layout,
compute dtype) and a device only. On every rank, inside Megatron's model-parallel state
(`lws_megatron.training.distributed`):

    args = ModelArgs.from_config(config, layout=plan.layout)
    chunks = build_model_chunks(args, seed=config.train.seed)   # this rank's chunk(s)
    ... forward/backward (lws_megatron.training.forward)
    sync_model_parallel_grads(chunks)        # QK-norm over TP, tied embedding over PP
"""

from lws_megatron.model.args import ModelArgs
from lws_megatron.model.attention import SDPAttention
from lws_megatron.model.build import (
    build_model,
    build_model_chunks,
    global_named_parameters,
    init_weights,
    trainable_parameter_count,
    transformer_config,
)
from lws_megatron.model.grads import sync_model_parallel_grads
from lws_megatron.model.inputs import check_batch
from lws_megatron.model.parallel import check_layout, virtual_pipeline_size

__all__ = [
    "ModelArgs",
    "SDPAttention",
    "build_model",
    "build_model_chunks",
    "check_batch",
    "check_layout",
    "global_named_parameters",
    "init_weights",
    "sync_model_parallel_grads",
    "trainable_parameter_count",
    "transformer_config",
    "virtual_pipeline_size",
]
