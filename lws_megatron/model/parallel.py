"""Megatron's model-parallel state from a config, after the config is checked.

Everything a user can get wrong about the split (heads that TP can't divide, a pipeline
layout that doesn't match the model) is checked in `check_parallel`, which touches no process
group, so the mistake surfaces as a one-line UserError instead of a hang or an assertion.
"""

from __future__ import annotations

import importlib
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

from lws_megatron.config import Config
from lws_megatron.errors import UserError
from lws_megatron.model import cuda_bridge


def pipeline_layout(config: Config) -> str | None:
    """`parallel.pipeline_layout` as Megatron takes it: None for its even split, else a layout.

    "auto" asks `lws_megatron.planner.plan_layout(config)` for one.
    """
    layout = config.parallel.pipeline_layout.strip()
    if layout == "auto":
        try:
            planner = importlib.import_module("lws_megatron.planner")
        except ModuleNotFoundError as err:
            if err.name != "lws_megatron.planner":
                raise
            raise UserError(
                "parallel.pipeline_layout=auto needs the layout planner (lws_megatron.planner), "
                "which this install lacks; give an explicit layout such as 'Et*3|t*3L' or leave "
                "it empty for an even split"
            ) from None
        layout = planner.plan_layout(config)
    return layout or None


def check_parallel(config: Config) -> str | None:
    """Check TP against every layer's heads and the pipeline split; return the layout."""
    tp, pp = config.parallel.tp, config.parallel.pp
    config.summary(tp)  # raises UserError naming the first layer whose heads TP can't divide
    layout = pipeline_layout(config)
    n = config.model.num_layers
    if layout is None:
        if n % pp:
            raise UserError(
                f"model.num_layers={n} doesn't split evenly over parallel.pp={pp}; set "
                f"parallel.pipeline_layout (e.g. {_example_layout(n, pp)!r}) or 'auto'"
            )
        return None
    try:
        PipelineParallelLayerLayout(layout, pp).validate_layer_layout(n, None)
    except (AssertionError, ValueError, KeyError, NotImplementedError) as err:
        raise UserError(
            f"parallel.pipeline_layout={layout!r} doesn't fit parallel.pp={pp} and "
            f"model.num_layers={n} ({err}); write one stage per '|' with E first, L last and "
            f"{n} t's, e.g. {_example_layout(n, pp)!r}"
        ) from None
    return layout


def check_world(config: Config, world: int, launched: str | None = None) -> int:
    """The data-parallel size of `world` processes; UserError when TP x PP or the batch can't
    split over them. `launched` says how the processes were asked for, for the message."""
    tp, pp = config.parallel.tp, config.parallel.pp
    launched = launched or f"{world} processes"
    if world % (tp * pp):
        raise UserError(
            f"{launched} can't hold parallel.tp={tp} x parallel.pp={pp}: launch a multiple of "
            f"{tp * pp} processes, or change parallel.tp/parallel.pp"
        )
    dp = world // (tp * pp)
    t = config.train
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise UserError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size} x data-parallel size {dp} ({launched} "
            f"/ TP {tp} / PP {pp}); use a multiple of {t.micro_batch_size * dp}"
        )
    return dp


def _example_layout(num_layers: int, pp: int) -> str:
    """A valid layout with the layers spread as evenly as they go (earlier stages get more)."""
    sizes = [num_layers // pp + (i < num_layers % pp) for i in range(pp)]
    return "E" + "|".join(f"t*{s}" for s in sizes) + "L"


def virtual_pipeline_size(layout: str | None, pp: int) -> int | None:
    """Model chunks per pipeline rank a layout asks for (None: no virtual pipeline)."""
    if layout is None:
        return None
    vpp = PipelineParallelLayerLayout.get_num_stages_from_str(layout) // pp
    return vpp if vpp > 1 else None


def initialize_parallel(config: Config) -> None:
    """Check the config, join the default process group if needed, build Megatron's groups.

    Without an initialised default group, joins one from the torchrun environment (nccl on
    CUDA, gloo on CPU). Also installs the CPU bridges (inert on CUDA) and, on CUDA, seeds
    Megatron's CUDA RNG tracker that TE attention and dropout draw from.
    """
    tp, pp = config.parallel.tp, config.parallel.pp
    layout = check_parallel(config)
    cuda_bridge.install()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    check_world(config, dist.get_world_size())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size(layout, pp),
    )
    if torch.cuda.is_available():
        model_parallel_cuda_manual_seed(config.train.seed)


def destroy_parallel() -> None:
    """Tear down Megatron's model-parallel groups (the default process group stays)."""
    parallel_state.destroy_model_parallel()
