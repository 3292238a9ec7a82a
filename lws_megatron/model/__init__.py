"""The LWS model on Megatron-Core: GPTModel with per-layer sizes, TP and PP on CPU and GPU.

Typical use on every rank (launched by torchrun, or inside an initialised process group):

    initialize_parallel(config)              # checks TP/PP against the model, builds groups
    chunks = build_model_chunks(config)      # this rank's GPTModel chunk(s), weights drawn
    step = forward_step(config)              # forward_step_func for Megatron's schedules
    ... get_forward_backward_func()(forward_step_func=step, model=chunks, ...)
    sync_model_parallel_grads(chunks)        # QK-norm over TP, tied embedding over PP
"""

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
from lws_megatron.model.parallel import check_parallel, destroy_parallel, initialize_parallel
from lws_megatron.model.step import forward_step, loss_func

__all__ = [
    "SDPAttention",
    "build_model",
    "build_model_chunks",
    "check_batch",
    "check_parallel",
    "destroy_parallel",
    "forward_step",
    "global_named_parameters",
    "init_weights",
    "initialize_parallel",
    "loss_func",
    "sync_model_parallel_grads",
    "trainable_parameter_count",
    "transformer_config",
]
