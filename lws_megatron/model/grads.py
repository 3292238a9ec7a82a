"""Gradient reductions that model parallelism needs beyond autograd, for chunks without DDP.

Some parameters' gradients come out partial on each rank:
- Shared QK-norm gains under TP (`model.qk_norm=head`): each TP rank normalises only its own
  heads with the shared gain, so its gradient is a partial sum over heads. The full-width gain
  (`full`) is split with the heads, so each rank's gradient is whole and is not summed.
- Norm gains under sequence parallelism (marked `sequence_parallel`, norm.py and TE's TENorm):
  each TP rank normalises its own slice of the sequence.
- A tied embedding under PP: the first stage holds the embedding and the last a copy as the
  output head (`build_model` starts them equal); each gets only its own use's gradient.

`sync_model_parallel_grads` sums them, each once. Megatron's `finalize_model_grads` does the
same (and the data-parallel reduction) for chunks wrapped in Megatron's DDP: call one or the
other, once per backward of the global batch, before clipping and the optimizer step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.utils import get_attr_wrapped_model
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def sync_model_parallel_grads(chunks: list[torch.nn.Module]) -> None:
    """Sum shared QK-norm and sequence-parallel norm gradients over TP ranks, and
    tied-embedding gradients over the first and last stage."""
    _sum_partial_norm_grads(chunks)
    _sum_tied_embedding_grads(chunks)


def _grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """Where the gradient lives: `main_grad` under Megatron's DDP, else `.grad`."""
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad


def _partial_over_tp(name: str, param: torch.nn.Parameter) -> bool:
    if getattr(param, "sequence_parallel", False):
        return True
    shared_qk = "q_layernorm" in name or "k_layernorm" in name
    return shared_qk and not getattr(param, "tensor_model_parallel", False)


def _sum_partial_norm_grads(chunks: list[torch.nn.Module]) -> None:
    group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return
    grads = [
        grad
        for chunk in chunks
        for name, param in chunk.named_parameters()
        if _partial_over_tp(name, param) and (grad := _grad(param)) is not None
    ]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(summed)


def _sum_tied_embedding_grads(chunks: list[torch.nn.Module]) -> None:
    group = parallel_state.get_embedding_group(check_initialized=False)
    if group is None or dist.get_world_size(group) == 1:
        return
    if not parallel_state.is_rank_in_embedding_group():
        return
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    chunk = chunks[0] if first else chunks[-1]
    gpt = get_attr_wrapped_model(chunk, "pre_process", return_model_obj=True)
    if not gpt.share_embeddings_and_output_weights:
        return
    grad = _grad(gpt.shared_embedding_or_output_weight())
    if grad is not None:
        dist.all_reduce(grad, group=group)
