"""torch.compile over Megatron-Core's modules, per layer or each model chunk whole.

`layers` compiles each TransformerLayer alone: Megatron's Python between layers (embedding,
output head, loss, pipeline hand-off) stays eager. `model` compiles the chunk's GPTModel
forward, loss included, as one graph, so Inductor also fuses the final norm, the output head's
cast and the vocabulary cross-entropy, and the step launches far fewer kernels. Both are free of
graph breaks on our spec (tests/model/test_compile.py holds them to that).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch._dynamo
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from torch._dynamo.utils import counters

from lws_megatron.errors import UserError
from lws_megatron.model.recompute import trace_checkpoints

CompileMode = Literal["none", "layers", "model"]


def check_cuda_graphs(mode: CompileMode, device: torch.device, tp: int, pp: int) -> None:
    """Where `train.cuda_graphs` can run: replaying a captured step needs CUDA, a compiled
    model to capture, and a step without pipeline hand-offs or TP collectives in between."""
    if device.type != "cuda":
        raise UserError(
            "train.cuda_graphs=true needs a CUDA device (a CPU has no graphs to replay); "
            "set train.cuda_graphs=false"
        )
    if mode != "model":
        raise UserError(
            f"train.cuda_graphs=true captures the compiled model, but train.compile={mode}; "
            "set train.compile=model"
        )
    if tp > 1 or pp > 1:
        raise UserError(
            f"train.cuda_graphs=true runs at parallel.tp=1 and parallel.pp=1 only (here {tp} "
            f"and {pp}); set train.cuda_graphs=false"
        )


def compile_chunks(chunks, mode: CompileMode, cuda_graphs: bool = False) -> None:
    """`cuda_graphs`: compile in reduce-overhead mode, which records the compiled forward and
    backward as CUDA graphs and replays them (checked by `check_cuda_graphs`)."""
    if mode == "none":
        return
    # LWS layers of one shape share a graph, but there are up to one shape per layer.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # Megatron's rotary table is lru_cached; Dynamo traces through the cache, which is right
    # here (a pure function of the sequence length), and warns once per process.
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    for chunk in chunks:
        prepare_for_compile(chunk)
        if mode == "model":
            chunk.compile(mode="reduce-overhead" if cuda_graphs else None)
        else:
            for layer in chunk.decoder.layers:
                layer.compile()


def prepare_for_compile(chunk) -> None:
    """With TP > 1 a column-parallel linear all-reduces its input gradient asynchronously,
    overlapped with the weight-gradient matmul; Dynamo cannot trace an async collective and
    splits every such linear out of the graph. Switched off, Megatron reduces the same gradient
    through `copy_to_tensor_model_parallel_region`, synchronously and inside the graph.

    Under sequence parallelism the same linear all-gathers its sequence-split input, again
    asynchronously (and once more in backward). Here Megatron's
    `gather_from_sequence_parallel_region` gathers it before the linear instead, in the graph,
    and its backward reduce-scatters the gradient; the matmul then keeps the gathered input
    for backward, not this rank's slice of it. Recomputation, too, is made traceable
    (`recompute.trace_checkpoints`)."""
    trace_checkpoints()
    for module in chunk.modules():
        if isinstance(module, ColumnParallelLinear):
            module.allreduce_dgrad = False
            if module.sequence_parallel:
                module.sequence_parallel = False
                module.disable_grad_reduce = True  # the gather's backward reduces instead
                module.register_forward_pre_hook(_gather_sequence)


def _gather_sequence(module: ColumnParallelLinear, args: tuple) -> tuple:
    gathered = gather_from_sequence_parallel_region(
        args[0], tensor_parallel_output_grad=True, group=module.tp_group
    )
    return (gathered, *args[1:])


def compile_stats() -> dict[str, int]:
    """Graphs Dynamo built in this process and the graph breaks it hit: a break splits a
    compiled region, and each piece costs its own launches and guards."""
    return {
        "compiled_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }
