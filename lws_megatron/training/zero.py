"""DeepSpeed ZeRO over Megatron-Core's process groups: it holds the optimizer state (sharded
over the data-parallel ranks at ZeRO >= 1) and gathers the updated weights. `fragments` is the
one place that knows where that state lives, for checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
from megatron.core import parallel_state as ps

from lws_megatron.config import Config
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


def deepspeed_config(config: Config, dp: int, bf16_weights: bool = False) -> dict[str, Any]:
    """The engine holds the optimizer state only: Megatron's DDP has reduced the gradients
    (`data_parallel.py`) and the train module clips and skips (`grad_scale`, `found_inf` on
    fused AdamW), so DeepSpeed's own reduction hooks, norm, clipping and overflow check stay
    off: at ZeRO >= 1 its step reads nothing back from the device."""
    t = config.train
    bf16 = config.zero.stage >= 1 and bf16_weights
    zero: dict[str, Any] = {"stage": config.zero.stage}
    if config.zero.stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=False, compute_grad_norm=False)
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.global_batch_size // dp,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        # ZeRO >= 1 with bf16 weights: DeepSpeed keeps (and shards) the fp32 masters, taking
        # bf16 gradients (its other bf16 optimizer would re-reduce them). Otherwise the weights
        # are fp32, or bf16 with our master-weight AdamW (training/optimizer.py).
        "bf16": {"enabled": bf16, "check_grad_overflow": False},
        "data_types": {"grad_accum_dtype": "bf16" if bf16 else "fp32"},
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
    if config.zero.stage >= 1:
        # Stage 2 reduces each gradient in a hook as backward produces it; DDP already does.
        for hook in engine.optimizer._grad_acc_hooks:
            hook.remove()
        engine.optimizer._grad_acc_hooks = []
    return engine


def fused_adamw(engine) -> torch.optim.Optimizer:
    """The torch AdamW that updates the (partitioned) fp32 weights: ours at ZeRO 0, the one
    DeepSpeed's ZeRO optimizer wraps at ZeRO >= 1."""
    optimizer = engine.optimizer
    return optimizer.optimizer if hasattr(optimizer, "averaged_gradients") else optimizer


def hand_over_grads(engine, params: list[torch.nn.Parameter]) -> None:
    """The reduced gradients (`main_grad`) as the `.grad` the optimizer reads.

    At ZeRO >= 1 DeepSpeed's optimizer takes its partition of them through its own
    end-of-backward step (`independent_gradient_partition_epilogue`); its only communication
    there reduces its own buckets, which stay empty since its hooks are off.
    """
    if getattr(engine.optimizer, "reads_main_grad", False):
        return
    for param in params:
        grad = param.main_grad
        param.grad = grad if grad.dtype == param.dtype else grad.to(param.dtype)
    if hasattr(engine.optimizer, "averaged_gradients"):
        engine.optimizer.independent_gradient_partition_epilogue()


@dataclass
class Fragment:
    """The optimizer state a rank holds of one weight: flat elements start..stop-1 of the
    (TP-local) weight, as 1-D views of the live `fp32_param`, `exp_avg` and `exp_avg_sq`."""

    start: int
    stop: int
    tensors: dict[str, torch.Tensor]


def fragments(engine, params: list[torch.nn.Parameter], share: tuple[int, int] | None):
    """{id(param): Fragment} of what this rank's optimizer holds; Adam's state is created
    (zeros, step 0) where no step has made it yet. At ZeRO >= 1 that is DeepSpeed's partition;
    at ZeRO 0 every rank holds everything, and `share` (rank, size) picks an even part of each
    weight (to save each element once)."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "single_partition_of_fp32_groups"):
        return _partition_fragments(optimizer, params)
    masters = dict(
        zip(map(id, getattr(optimizer, "model_params", [])), getattr(optimizer, "masters", []))
    )
    found = {}
    for param in params:
        master = masters.get(id(param), param)  # fp32 weights are their own masters
        state = _adam_state(optimizer, master)
        n = param.numel()
        rank, size = share or (0, 1)
        start, stop = rank * n // size, (rank + 1) * n // size
        views = {
            "fp32_param": master,
            "exp_avg": state["exp_avg"],
            "exp_avg_sq": state["exp_avg_sq"],
        }
        found[id(param)] = Fragment(
            start, stop, {k: v.detach().view(-1)[start:stop] for k, v in views.items()}
        )
    return found


def _partition_fragments(optimizer, params):
    """DeepSpeed ZeRO-1/2: each weight's slice of the flat fp32 partition (`_hp_mapping`)."""
    found = {}
    for param in params:
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            continue
        flat = optimizer.single_partition_of_fp32_groups[mapping.param_group_index]
        state = _adam_state(optimizer.optimizer, flat)
        lo, n = mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel
        start = mapping.lp_fragment_address.start
        views = {"fp32_param": flat, "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
        found[id(param)] = Fragment(
            start, start + n, {k: v.detach().narrow(0, lo, n) for k, v in views.items()}
        )
    return found


def _adam_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    """torch AdamW's state of `param`, made as its first step would make it (fused)."""
    state = optimizer.state[param]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


def optimizer_step(engine) -> int:
    """AdamW's step count (a skipped step leaves it; it is the same for every weight)."""
    for state in fused_adamw(engine).state.values():
        return int(state["step"].item())
    return 0


def set_optimizer_step(engine, step: int) -> None:
    for state in fused_adamw(engine).state.values():
        state["step"].fill_(step)
