"""The model's and its optimizer's state as Megatron-Core ShardedTensors: every tensor under its
global name and shape, with the box of it that this rank holds.

Weights come from Megatron-Core's `sharded_state_dict` (global layer numbers, TP splits, SwiGLU's
gate and up halves, the tied head as the embedding); our own modules give theirs (`FullQKNorm`).
The optimizer's fp32 master, exp_avg and exp_avg_sq of a weight take its key under
`optimizer.state.{name}.` and its global shape (Megatron's DistributedOptimizer's names). A rank
holds, at any ZeRO stage, a contiguous range of each weight's flattened (TP-local) values:
DeepSpeed's partition at ZeRO >= 1, an even share at ZeRO 0 (`zero.fragments`). A range of a
row-major tensor is a few boxes (`flat_boxes`), each a box of the global tensor, so every rank
saves what it holds with no data exchanged, and at another layout reads only what its own
ranges need. Megatron's DistributedOptimizer saved such ranges as `flattened_range`, which
megatron-core 0.16 no longer supports; its `fully_reshardable` form instead gathers the
optimizer state of a whole model shard on every data-parallel rank before saving.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

OPTIMIZER_STATES = ("fp32_param", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Box:
    start: tuple[int, ...]
    size: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.size)


def flat_boxes(shape: tuple[int, ...], lo: int, hi: int) -> list[tuple[Box, int]]:
    """Elements lo..hi-1 (row-major) of a tensor of `shape` as boxes, each with the flat index
    of its first element; every box is contiguous in that order. At most 2 * ndim - 1 boxes."""
    if lo >= hi:
        return []
    if len(shape) <= 1:
        return [(Box((lo,), (hi - lo,)), lo)]
    inner = math.prod(shape[1:])
    first, last = -(-lo // inner), hi // inner  # the whole rows in lo..hi
    if first > last:  # within one row
        row = lo // inner
        return _in_row(row, shape, lo - row * inner, hi - row * inner, inner)
    boxes = _in_row(first - 1, shape, lo - (first - 1) * inner, inner, inner) if lo % inner else []
    if last > first:
        boxes.append(
            (Box((first,) + (0,) * (len(shape) - 1), (last - first,) + shape[1:]), first * inner)
        )
    if hi % inner:
        boxes += _in_row(last, shape, 0, hi - last * inner, inner)
    return boxes


def _in_row(row: int, shape: tuple[int, ...], lo: int, hi: int, inner: int):
    return [
        (Box((row,) + box.start, (1,) + box.size), row * inner + first)
        for box, first in flat_boxes(shape[1:], lo, hi)
    ]


def intersect(a: Box, b: Box) -> Box | None:
    start = tuple(max(x, y) for x, y in zip(a.start, b.start))
    stop = tuple(min(x + m, y + n) for x, y, m, n in zip(a.start, b.start, a.size, b.size))
    if any(e <= s for s, e in zip(start, stop)):
        return None
    return Box(start, tuple(e - s for s, e in zip(start, stop)))


@dataclass
class Piece:
    """A weight's ShardedTensor and the box of the (TP-local) weight it covers: the whole
    weight, or a part of it under a factory (SwiGLU's fc1 is two, gate and up)."""

    param: torch.nn.Parameter
    sharded: ShardedTensor
    box: Box


def pieces(chunk: torch.nn.Module) -> list[Piece]:
    """Every ShardedTensor of a model chunk, each found in the weight it is a view of."""
    state = chunk.sharded_state_dict()
    apply_factories(state)
    params = list(chunk.parameters())
    found = []
    for sharded in nested_values(state):
        if isinstance(sharded, ShardedObject):
            if not sharded.key.endswith("_extra_state"):
                raise RuntimeError(f"{sharded.key}: a non-tensor state; it has no checkpoint")
            continue  # TE's and Megatron's empty `_extra_state` (FP8 metadata; no FP8 here)
        param = _owner(sharded.data, params)
        if param is None:
            raise RuntimeError(f"{sharded.key}: not a view of a parameter; it cannot be loaded")
        first = sharded.data.storage_offset() - param.storage_offset()
        start = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), param.shape))
        found.append(Piece(param, sharded, Box(start, tuple(sharded.data.shape))))
    return found


def _owner(view: torch.Tensor, params: list[torch.nn.Parameter]):
    storage = view.untyped_storage().data_ptr()
    for param in params:
        lo = param.storage_offset()
        if (
            param.untyped_storage().data_ptr() == storage
            and lo <= view.storage_offset() < lo + param.numel()
        ):
            return param
    return None


def _replica(sharded: ShardedTensor) -> tuple[int, int]:
    """(its replica number apart from data parallelism, its data-parallel replica number).
    Megatron's replica ids are (PP, TP, DP); a plain 0 is the one copy."""
    rid = sharded.replica_id
    if isinstance(rid, int):
        return rid, 0
    return int(any(rid[:-1])), rid[-1]


def weights(all_pieces: list[Piece], dp_rank: int, dp: int, loading: bool) -> list[ShardedTensor]:
    """The weights this rank saves (or, `loading`, reads): each data-parallel replica saved once,
    spread over the data-parallel ranks by size (every rank of a replica group sees the same
    tensors, so each computes the same spread)."""
    if loading:
        return [p.sharded for p in all_pieces]
    mains = [p.sharded for p in all_pieces if _replica(p.sharded)[0] == 0]
    order = sorted(range(len(mains)), key=lambda i: (-mains[i].data.numel(), mains[i].key))
    load, mine = [0] * dp, []
    for i in order:
        owner = min(range(dp), key=lambda r: (load[r], r))
        load[owner] += mains[i].data.numel()
        if owner == dp_rank:
            mine.append(mains[i])
    return mine


def optimizer_state(all_pieces: list[Piece], fragments: dict, loading: bool) -> list[ShardedTensor]:
    """The optimizer state of the ranges `fragments` holds ({id(param): zero.Fragment}) as
    boxes of the global tensors. Saving skips the copies of a weight kept on other TP ranks or
    pipeline stages (the same state); loading fills them too."""
    found = []
    for piece in all_pieces:
        fragment = fragments.get(id(piece.param))
        if fragment is None or (not loading and _replica(piece.sharded)[0]):
            continue
        for box, first in flat_boxes(tuple(piece.param.shape), fragment.start, fragment.stop):
            part = intersect(box, piece.box)
            if part is None:
                continue
            for name, values in fragment.tensors.items():
                lo = first - fragment.start
                data = values[lo : lo + box.numel].view(box.size)
                for dim, (s, b, n) in enumerate(zip(part.start, box.start, part.size)):
                    data = data.narrow(dim, s - b, n)
                found.append(_moved(piece, part, f"optimizer.state.{name}.", data))
    return found


def _moved(piece: Piece, part: Box, prefix: str, data: torch.Tensor) -> ShardedTensor:
    """`data` (the box `part` of the weight) as a box of the global tensor of `piece`."""
    sharded, lead = piece.sharded, piece.sharded.prepend_axis_num
    offset = tuple(
        o + s - b for o, s, b in zip(sharded.global_offset[lead:], part.start, piece.box.start)
    )
    return ShardedTensor(
        key=prefix + sharded.key,
        data=data,
        dtype=data.dtype,
        local_shape=part.size,
        global_shape=sharded.global_shape,
        global_offset=tuple(sharded.global_offset[:lead]) + offset,
        axis_fragmentations=None,
        replica_id=0,
        prepend_axis_num=lead,
    )
