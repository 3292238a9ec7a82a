"""ZeRO >= 1's all-gather of the updated weights, behind the next step's forward.

DeepSpeed's ZeRO step updates this rank's shard of each parameter group, then all-gathers every
group before it returns, so the whole gather sits between two steps. Here the optimizer's groups
are cut in forward order into segments of about one gradient bucket (`split_groups`), each
partitioned over the data-parallel ranks by DeepSpeed as a group of its own. The step only
starts each group's gather (asynchronously, in forward order, in place of DeepSpeed's blocking
call), and a module waits for its own segment when its forward begins, so the gather of the
later layers runs behind the forward of the earlier ones, as Megatron-Core's distributed
optimizer does with `overlap_param_gather`. Reading or loading a module's state first waits
for every gather.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.runtime.zero import stage_1_and_2

from lws_megatron.config import ZeroConfig
from lws_megatron.training.data_parallel import bucket_size

_DEEPSPEED_GATHER = stage_1_and_2.all_gather_dp_groups
_GATHERS: "weakref.WeakSet[WeightGather]" = weakref.WeakSet()


def segments(chunks: list[torch.nn.Module], zero: ZeroConfig, dp: int) -> list[list[torch.Tensor]]:
    """Each chunk's trainable parameters in model order, cut into runs of about a bucket."""
    runs: list[list[torch.Tensor]] = []
    for chunk in chunks:
        params = [p for p in chunk.parameters() if p.requires_grad]
        size = bucket_size(zero, sum(p.numel() for p in params), dp)
        run, numel = [], 0
        for param in params:
            run.append(param)
            numel += param.numel()
            if numel >= size:
                runs.append(run)
                run, numel = [], 0
        if run:
            runs.append(run)
    return runs


def split_groups(groups: list[dict], runs: list[list[torch.Tensor]]) -> list[dict]:
    """The optimizer's groups, each cut by segment, ordered by segment: the same
    hyperparameters over the same parameters, one group per (segment, group) that has any."""
    run_of = {id(p): index for index, run in enumerate(runs) for p in run}
    split = []
    for index in range(len(runs)):
        for group in groups:
            params = [p for p in group["params"] if run_of[id(p)] == index]
            if params:
                split.append({**group, "params": params})
    return split


class WeightGather:
    """The gathers a ZeRO step started, and the waits that end them in forward order."""

    def __init__(self, optimizer: Any, runs: list[list[torch.Tensor]]) -> None:
        run_of = {id(p): index for index, run in enumerate(runs) for p in run}
        self.optimizer = optimizer
        # DeepSpeed keeps our groups' order: group i is the i-th of `split_groups`.
        self.segment = [run_of[id(group[0])] for group in optimizer.bit16_groups]
        self.run_of = run_of
        self.pending: list[tuple[int, Any]] = []
        _GATHERS.add(self)

    def start(self, groups_flat, partitioned_param_groups, dp_process_group) -> None:
        self.wait()  # a segment no forward used since the last step
        for index, (flat, parts) in enumerate(zip(groups_flat, partitioned_param_groups)):
            group = dp_process_group[index]
            if dist.get_world_size(group=group) == 1:
                continue
            mine = parts[dist.get_rank(group=group)]
            work = dist.all_gather_into_tensor(flat, mine, group=group, async_op=True)
            self.pending.append((self.segment[index], work))

    def wait(self, upto: float = math.inf) -> None:
        """End the gathers of every segment up to `upto` (all by default)."""
        while self.pending and self.pending[0][0] <= upto:
            self.pending.pop(0)[1].wait()

    def hook(self, modules: list[torch.nn.Module], per_module: bool) -> None:
        """Waits before each module's forward (`per_module`), or before each of `modules`'
        (wrappers that run eagerly around compiled chunks), and before any state read."""
        for top in modules:
            for module in top.modules():
                params = module.parameters(recurse=False)
                own = [self.run_of[id(p)] for p in params if id(p) in self.run_of]
                if own:
                    module.register_state_dict_pre_hook(lambda *_: self.wait())
                    module.register_load_state_dict_pre_hook(lambda *_: self.wait())
                if own and per_module:
                    upto = max(own)
                    module.register_forward_pre_hook(lambda *_, upto=upto: self.wait(upto))
            if not per_module:
                top.register_forward_pre_hook(lambda *_: self.wait())


def install(engine, chunks: list[torch.nn.Module], runs, compiled: bool) -> WeightGather:
    """Gather `engine`'s ZeRO step's weights behind the forward of `chunks` (the DDP-wrapped
    ones; with `compiled`, the wait is at each chunk's start: hooks inside a compiled graph
    would break it)."""
    stage_1_and_2.all_gather_dp_groups = _all_gather_dp_groups
    gather = WeightGather(engine.optimizer, runs)
    gather.hook(chunks, per_module=not compiled)
    return gather


def _all_gather_dp_groups(*, groups_flat, partitioned_param_groups, dp_process_group, **kwargs):
    for gather in _GATHERS:
        if gather.optimizer.bit16_groups_flat is groups_flat:
            return gather.start(groups_flat, partitioned_param_groups, dp_process_group)
    return _DEEPSPEED_GATHER(
        groups_flat=groups_flat,
        partitioned_param_groups=partitioned_param_groups,
        dp_process_group=dp_process_group,
        **kwargs,
    )
