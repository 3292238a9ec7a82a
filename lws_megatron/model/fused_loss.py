"""The output head and its cross-entropy in one pass over chunks of tokens (`model.fused_loss`).

Megatron's head writes every token's logits, [tokens, vocab / tp], and its vocab-parallel
cross-entropy keeps their fp32 softmax for backward: 3.3 GB at 16K tokens x 50K vocabulary,
written once and read twice. Here the logits of `model.loss_chunk_rows` tokens at a time are made,
reduced to a logsumexp and the target's logit, and dropped; backward makes them again, chunk by
chunk, for the gradients. An fp32 logsumexp per token is all that is kept. The numbers are
Megatron's: matmuls in the compute dtype, softmax in fp32, the vocabulary split over TP as
ColumnParallelLinear splits it (padded rows included), the input gradient summed over TP. Under
sequence parallelism the hidden states arrive split along the sequence and are gathered first,
as ColumnParallelLinear gathers them; the gather's backward then sums the input gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region


class FusedLossGPTModel(GPTModel):
    """GPTModel whose loss comes from `linear_cross_entropy`. Without labels (generation,
    export) or off the last stage, Megatron's own head runs: the same logits as ever.

    `fused` set to False runs Megatron's head on the same weights: the GPU measurement's
    ablation switches it in place, without a second build (a compiled chunk recompiles).
    """

    def __init__(self, *args, loss_chunk_rows: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss_chunk_rows = loss_chunk_rows
        self.fused = True

    def _postprocess(self, hidden_states, labels=None, **kwargs):
        if labels is None or not self.post_process or not self.fused:
            return super()._postprocess(hidden_states=hidden_states, labels=labels, **kwargs)
        return self.head_loss(hidden_states, labels)

    def head_loss(self, hidden_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token loss [b, s] of the final hidden states [s, b, d] (after the final norm;
        [s / tp, b, d] under sequence parallelism)."""
        if self.share_embeddings_and_output_weights:
            weight = self.shared_embedding_or_output_weight()
        else:
            weight = self.output_layer.weight
        group = self.pg_collection.tp
        split = self.config.sequence_parallel
        if split:
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=True, group=group
            )
        loss = linear_cross_entropy(
            hidden_states, weight, labels.t(), self.loss_chunk_rows, group, not split
        )
        return loss.t().contiguous()


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_rows: int,
    group: dist.ProcessGroup | None = None,
    sum_input_grad: bool = True,
) -> torch.Tensor:
    """Per-token fp32 cross-entropy of the logits `hidden @ weight.T` against `labels`.

    `hidden` is [..., d] and `labels` its leading shape; `weight` is this rank's rows of the
    vocabulary, [V / tp, d], rank r holding rows r * V / tp onwards of `group` (None: all of it).
    `sum_input_grad`: all-reduce `hidden`'s gradient over `group` (False: whoever gathered
    `hidden` sums it). The matmuls run in the autocast dtype when autocast is on, like a linear
    layer's.
    """
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    tp = dist.get_world_size(group) if group is not None else 1
    vocab_start = dist.get_rank(group) * weight.shape[0] if tp > 1 else 0
    loss = _LinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]).to(dtype),
        weight.to(dtype),
        labels.reshape(-1),
        chunk_rows,
        vocab_start,
        group if tp > 1 else None,
        sum_input_grad,
    )
    return loss.view(labels.shape)


class _LinearCrossEntropy(torch.autograd.Function):
    """hidden [n, d], weight [v, d], target [n] -> loss [n], never holding more than
    `chunk_rows` rows of logits."""

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk_rows, vocab_start, group, sum_input_grad):
        owned = (target >= vocab_start) & (target < vocab_start + weight.shape[0])
        local_target = torch.where(owned, target - vocab_start, 0)
        lse, target_logit = [], []
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = (hidden[rows] @ weight.t()).float()
            lse.append(torch.logsumexp(logits, dim=-1))
            target_logit.append(logits.gather(1, local_target[rows, None]).squeeze(1))
        lse = torch.cat(lse)
        target_logit = torch.where(owned, torch.cat(target_logit), 0.0)
        if group is not None:
            lse, target_logit = _over_shards(lse, target_logit, group)
        ctx.save_for_backward(hidden, weight, local_target, owned, lse)
        ctx.chunk_rows, ctx.group = chunk_rows, group if sum_input_grad else None
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, local_target, owned, lse = ctx.saved_tensors
        hit = owned.float()[:, None]
        grad_hidden = []
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            # d loss / d logits = softmax - one_hot(target), the one-hot on its owner's shard.
            grad_logits = (hidden[rows] @ weight.t()).float().sub_(lse[rows, None]).exp_()
            grad_logits.scatter_add_(1, local_target[rows, None], -hit[rows])
            grad_logits = grad_logits.mul_(grad_loss[rows, None]).to(hidden.dtype)
            grad_hidden.append(grad_logits @ weight)
            grad_weight += grad_logits.t() @ hidden[rows]
        grad_hidden = torch.cat(grad_hidden)
        if ctx.group is not None:
            # What ColumnParallelLinear's input copy does: each shard's part of the sum.
            dist.all_reduce(grad_hidden, group=ctx.group)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None


def _over_shards(
    lse: torch.Tensor, target_logit: torch.Tensor, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's logsumexp over its shard -> over the whole vocabulary; the target's logit
    from the rank that owns it (the others hold 0). Two all-reduces for all the tokens."""
    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    sums = torch.stack([torch.exp(lse - top), target_logit])
    dist.all_reduce(sums, group=group)
    return top + torch.log(sums[0]), sums[1]
