"""Data-parallel communication behind compute: the gradient reduction really starts before
backward ends and skips the micro batches before the last; ZeRO's gather of the updated weights
is only started by the step and waited for layer by layer in the next forward; neither changes
any number.

Real processes on gloo (`run_distributed`), each a TrainModule stepping on synthetic batches.
"""

import pytest
import torch

from tests.helpers import TINY
from tests.helpers.dist_utils import run_distributed

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
    the reduction and the weight gather overlapped equal those of one reduction after the
    whole backward and the gather inside the step."""
    world = 4 if "parallel.pp=2" in layout else 2
    common = ["optim.lr=3e-3", *layout]
    overlapped = run_distributed(_losses, world, common)
    serial = ["zero.overlap_grad_reduce=false", "zero.overlap_param_gather=false"]
    after = run_distributed(_losses, world, [*common, *serial])
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


class _RecordedWork:
    def __init__(self, work, events: list[str]) -> None:
        self.work, self.events = work, events

    def wait(self):
        self.events.append("wait")
        return self.work.wait()


def _gather_order(overrides: list[str]) -> list[str]:
    """During a step and the next one's forward: 'gather' for each all-gather started
    asynchronously ('blocking gather' otherwise), 'wait' when one is waited for, 'step' when
    the step returns, 'first'/'last' when the first/last decoder layer's forward begins."""
    import torch.distributed as dist

    module, plan = _module(overrides)
    module.train_batch(_batches(module, plan, 0))
    events: list[str] = []
    all_gather = dist.all_gather_into_tensor

    def recorded(output, tensor, group=None, async_op=False):
        events.append("gather" if async_op else "blocking gather")
        work = all_gather(output, tensor, group=group, async_op=async_op)
        return _RecordedWork(work, events) if async_op else work

    layers = module.chunks[0].decoder.layers
    layers[0].register_forward_pre_hook(lambda *_: events.append("first"))
    layers[-1].register_forward_pre_hook(lambda *_: events.append("last"))
    dist.all_gather_into_tensor = recorded
    try:
        module.train_batch(_batches(module, plan, 1))
        events.append("step")
        module.train_batch(_batches(module, plan, 2))
    finally:
        dist.all_gather_into_tensor = all_gather
    return events


@pytest.mark.parametrize("stage", [1, 2])
def test_the_weight_gather_runs_behind_the_next_forward(stage):
    """The step returns with every gather started and none waited for; the next forward
    waits for the first segment before the first layer, for the later ones after it (the
    last layer's segment after the first layer, the head's after the last layer)."""
    for events in run_distributed(_gather_order, 2, [f"zero.stage={stage}"]):
        step = events.index("step")
        assert events[:step].count("gather") >= 3 and "wait" not in events[:step]
        forward = events[step:]
        first, last = forward.index("first"), forward.index("last")
        waits = [i for i, e in enumerate(forward) if e == "wait"]
        assert len(waits) == events[:step].count("gather")
        assert waits[0] < first < last < waits[-1]
        assert any(first < w < last for w in waits)


def _weights_after_steps(overrides: list[str]) -> tuple[list[float], list[float]]:
    """Right after two steps, with no forward since: each weight's sum as its tensor holds it,
    and as the model's state_dict gives it."""
    module, plan = _module(overrides)
    for step in range(2):
        module.train_batch(_batches(module, plan, step))
    held = [p.detach().double().sum().item() for p in module.params]
    state = module.chunks[0].state_dict()
    read = [v.double().sum().item() for v in state.values() if isinstance(v, torch.Tensor)]
    return held, read


def test_a_state_read_waits_for_the_gather_and_without_overlap_the_step_gathers():
    """Without the overlap every rank holds the same updated weights when the step returns;
    with it a state read (a checkpoint's) waits for the gathers and reads those weights."""
    serial = run_distributed(
        _weights_after_steps, 2, ["zero.stage=1", "zero.overlap_param_gather=false"]
    )
    overlapped = run_distributed(_weights_after_steps, 2, ["zero.stage=1"])
    assert serial[0][0] == serial[1][0]
    assert overlapped[0][1] == overlapped[1][1] == serial[0][1]
