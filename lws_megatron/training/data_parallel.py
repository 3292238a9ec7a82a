"""Data-parallel gradients: Megatron-Core's DistributedDataParallel around each model chunk, and
the hooks through which Megatron's schedules drive it.

DDP keeps each chunk's gradients in contiguous buckets (`param.main_grad`). Within a step's last
micro batch, a bucket's all-reduce starts (asynchronously, on any backend) the moment backward
has produced all of its gradients, so the reduction of the layers near the output runs while
backward still computes the layers near the input; earlier micro batches only accumulate
(`no_sync`). With VPP, a chunk's buckets start when its last backward is done (`grad_sync_func`).
The schedule then calls `finalize`, which waits for the reductions and adds the sums that model
parallelism needs (`model/grads.py`: Megatron's own `finalize_model_grads` would sum the
full-width QK-norm gain over TP, which is wrong for it).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from lws_megatron.config import ZeroConfig
from lws_megatron.model import sync_model_parallel_grads

MEGATRON_BUCKET = 40_000_000  # Megatron-Core's default bucket, in parameters


def bucket_size(zero: ZeroConfig, chunk_params: int, dp: int) -> int:
    """`zero.bucket_size`, or for 0 a quarter of the chunk (so that three of its four buckets
    reduce behind backward) capped at Megatron's default, which grows with DP so that each
    rank's piece of a bucket stays large enough for bandwidth-bound collectives."""
    if zero.bucket_size:
        return zero.bucket_size
    return min(max(MEGATRON_BUCKET, 1_000_000 * dp), math.ceil(chunk_params / 4))


def grad_reduce_in_fp32(zero: ZeroConfig, params_dtype: torch.dtype, micro_batches: int) -> bool:
    """`zero.grad_reduce_dtype`: auto reduces in the weights' own dtype, except that gradients
    accumulated over several micro batches add up in fp32."""
    if zero.grad_reduce_dtype != "auto":
        return zero.grad_reduce_dtype == "fp32"
    return params_dtype == torch.float32 or micro_batches > 1


def wrap_chunks(
    chunks: list[torch.nn.Module], zero: ZeroConfig, params_dtype: torch.dtype, micro_batches: int
) -> list[DistributedDataParallel]:
    """Each chunk in DDP, and the schedule's sync hooks set on the first chunk's config (the
    one Megatron's schedules read). Chunks after the first keep one bucket each, as in
    Megatron-LM: their reduction starts when their last backward is done."""
    dp = ps.get_data_parallel_world_size()
    wrapped = []
    for index, chunk in enumerate(chunks):
        config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=grad_reduce_in_fp32(zero, params_dtype, micro_batches),
            overlap_grad_reduce=zero.overlap_grad_reduce,
            bucket_size=bucket_size(zero, sum(p.numel() for p in chunk.parameters()), dp),
        )
        wrapped.append(
            DistributedDataParallel(chunk.config, config, chunk, disable_bucketing=index > 0)
        )
    schedule_config = wrapped[0].config
    schedule_config.finalize_model_grads_func = finalize
    if zero.overlap_grad_reduce:
        single = len(wrapped) == 1
        no_sync = [c.no_sync for c in wrapped]
        grad_sync = [c.start_grad_sync for c in wrapped]
        schedule_config.no_sync_func = no_sync[0] if single else no_sync
        schedule_config.grad_sync_func = grad_sync[0] if single else grad_sync
    return wrapped


def finalize(chunks: list[DistributedDataParallel], *_, **__) -> None:
    """The schedule's `finalize_model_grads_func`: every bucket reduced, then the model-parallel
    sums, on `main_grad`."""
    for chunk in chunks:
        chunk.finish_grad_sync()
    sync_model_parallel_grads(chunks)


@contextlib.contextmanager
def no_sync(chunks: list[DistributedDataParallel]) -> Iterator[None]:
    """Backward passes that are no step's (a benchmark's block timings): their gradients land
    in the buckets, which the next step empties, and start no reduction."""
    with contextlib.ExitStack() as stack:
        for chunk in chunks:
            stack.enter_context(chunk.no_sync())
        yield


def zero_grad(chunks: list[DistributedDataParallel]) -> None:
    """Empty buckets for the next step; no `.grad` left over for autograd to accumulate into."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
        for param in chunk.parameters():
            param.grad = None


def main_grads(chunks: list[DistributedDataParallel]) -> list[torch.Tensor]:
    return [p.main_grad for c in chunks for p in c.parameters() if p.requires_grad]
