"""Data-parallel gradients reduced during backward: the reduction really starts before backward
ends, skips the micro batches before the last, and changes no number.

Real processes on gloo (`run_distributed`), each a TrainModule stepping on synthetic batches.
"""

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.training.test_training import TINY

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _module(overrides: list[str]):
    from lws_megatron.config import load_config
    from lws_megatron.training import distributed
    from lws_megatron.training.train_module import TrainModule

    distributed.init_processes()
    config = load_config(TINY, overrides)
    plan = distributed.resolve_plan(config, torch.distributed.get_world_size())
    distributed.initialize_model_parallel(plan, config.train.seed)
    return TrainModule(config, plan, torch.device("cpu")), plan


def _batches(module, plan, step: int):
    """This DP rank's micro batches of step `step`: different on every DP rank."""
    from megatron.core import parallel_state as ps

    from lws_megatron.measure.batches import synthetic_batch

    rank = ps.get_data_parallel_rank()
    return [
        synthetic_batch(module.config, plan.micro_batch_size, 1000 * step + 10 * rank + i)
        for i in range(plan.micro_batches)
    ]


def _losses(overrides: list[str], steps: int = 4) -> list[float]:
    """The same batches each step, so that the loss falls as the model learns them."""
    module, plan = _module(overrides)
    batches = _batches(module, plan, 0)
    return [module.train_batch(batches).loss.item() for _ in range(steps)]


@pytest.mark.parametrize(
    "layout",
    [
        ["zero.stage=0"],
        ["zero.stage=1"],
        ["zero.stage=2"],
        ["zero.stage=1", "parallel.pp=2", "parallel.pipeline_layout=Et|t|t|tL"],
        ["zero.stage=2", "parallel.pp=2"],
    ],
    ids=["zero0", "zero1", "zero2", "zero1-pp2-vpp2", "zero2-pp2"],
)
def test_overlapped_reduction_changes_no_loss(layout):
    """DP=2 (4 processes with PP=2), two micro batches a step on each rank: the losses with
    the reduction overlapped equal those of one reduction after the whole backward."""
    world = 4 if "parallel.pp=2" in layout else 2
    common = ["optim.lr=3e-3", *layout]
    overlapped = run_distributed(_losses, world, common)
    after = run_distributed(_losses, world, [*common, "zero.overlap_grad_reduce=false"])
    assert overlapped[-1] == pytest.approx(after[-1], abs=1e-6)
    assert overlapped[-1][-1] < overlapped[-1][0] - 0.1  # it learns the batches


def _event_order(overrides: list[str]) -> list[str]:
    """What happens in order during the second step (the first one learns the buckets):
    'reduce' for each data-parallel all-reduce issued ('blocking' if it waits for its end),
    'layer0' when the first decoder layer's backward ends (the last layer backward reaches,
    in each micro batch)."""
    import torch.distributed as dist

    module, plan = _module(overrides)
    module.train_batch(_batches(module, plan, 0))
    events: list[str] = []
    all_reduce = dist.all_reduce

    def recorded(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if group is not None and dist.get_world_size(group) > 1 and tensor.numel() > 2:
            events.append("reduce" if async_op else "blocking")  # not the loss or token count
        return all_reduce(tensor, op, group, async_op)

    first_layer = module.chunks[0].decoder.layers[0]
    first_layer.register_full_backward_hook(lambda *_: events.append("layer0"))
    dist.all_reduce = recorded
    try:
        module.train_batch(_batches(module, plan, 1))
    finally:
        dist.all_reduce = all_reduce
    return events


def test_the_reduction_starts_during_the_last_micro_batchs_backward():
    """Two micro batches: nothing is reduced in the first one's backward; in the second, the
    buckets of the layers near the output are issued before the first layer's backward ends,
    and the bucket holding it (and the embedding) after."""
    for events in run_distributed(_event_order, 2, ["zero.stage=1"]):
        assert events.count("layer0") == 2
        first_done, last_done = (i for i, e in enumerate(events) if e == "layer0")
        reduces = [i for i, e in enumerate(events) if e == "reduce"]
        assert len(reduces) >= 3
        assert first_done < reduces[0] < last_done < reduces[-1]


def test_without_overlap_the_reduction_waits_for_backward():
    for events in run_distributed(_event_order, 2, ["zero.overlap_grad_reduce=false"]):
        assert events[:2] == ["layer0", "layer0"] and set(events[2:]) == {"blocking"}
