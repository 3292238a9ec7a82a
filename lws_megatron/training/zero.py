"""DeepSpeed ZeRO over Megatron-Core's process groups, configured from our YAML."""

from __future__ import annotations

from typing import Any

import deepspeed
import torch
from megatron.core import parallel_state as ps

from lws_megatron.config import Config
from lws_megatron.training.checkpoint import SafeCheckpointEngine
from lws_megatron.training.distributed import skip_cpu_comm_op


class MegatronMPU:
    """DeepSpeed's `mpu=` interface (the old Megatron names) over megatron.core.parallel_state.

    "Model parallel" for DeepSpeed is the TP x PP group: gradient norms are summed over every
    model shard. Its rank is the tensor-parallel rank, because DeepSpeed counts a parameter that
    is not TP-split only on model-parallel rank 0, and each pipeline stage owns different ones.
    """

    get_model_parallel_group = staticmethod(ps.get_model_parallel_group)
    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return (
            ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size()
        )


def uses_deepspeed_backward(config: Config) -> bool:
    """ZeRO-2/3 reduce gradients in backward hooks, so each micro batch goes through
    `engine.backward`; stages 0/1 let Megatron's schedule run backward and reduce at the end."""
    return config.zero.stage >= 2


def deepspeed_config(config: Config, dp: int, bf16_weights: bool = False) -> dict[str, Any]:
    t = config.train
    if uses_deepspeed_backward(config):
        micro, accumulation = t.micro_batch_size, t.global_batch_size // (t.micro_batch_size * dp)
    else:
        micro, accumulation = t.global_batch_size // dp, 1
    zero: dict[str, Any] = {"stage": config.zero.stage}
    if config.zero.stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True)
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        # Without ZeRO the runtime clips itself (step._plain_step): DeepSpeed's stage-0
        # clipping neither reports the norm nor counts pipeline-stage parameters right.
        "gradient_clipping": config.optim.clip_grad if config.zero.stage else 0.0,
        "zero_optimization": zero,
        # ZeRO >= 1 with bf16 weights: DeepSpeed keeps (and shards) the fp32 masters. Otherwise
        # its bf16 optimizer, with its per-parameter host-synchronising checks, stays out: the
        # weights are fp32, or bf16 with our master-weight AdamW (training/optimizer.py).
        "bf16": {"enabled": config.zero.stage >= 1 and bf16_weights},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # On by default, the throughput timer synchronises the device in a hook on every
        # forward of the engine's module and in every step().
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }


def initialize_engine(
    config: Config,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dp: int,
    bf16_weights: bool = False,
):
    """`bf16_weights`: the model holds bf16 weights (`train.precision`, as resolved)."""
    skip_cpu_comm_op()  # a process group set up without init_processes (tests, notebooks)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(config, dp, bf16_weights),
        mpu=MegatronMPU,
        dist_init_required=False,
    )
    # DeepSpeed's own engine unpickles whatever a checkpoint file holds.
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    return engine
