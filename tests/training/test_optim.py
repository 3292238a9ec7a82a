"""Learning-rate schedules, what a step is due for, and weight-decay groups: pure functions of
the step and the names."""

import math

import pytest
import torch

from lws_megatron.config import OptimConfig, load_config
from lws_megatron.training.param_groups import exclusion_kind, param_groups
from lws_megatron.training.schedule import Due, due, learning_rate
from tests.helpers import TINY


def lrs(max_steps=100, **kw):
    optim = OptimConfig(lr=1.0, min_lr=0.1, **kw)
    return [learning_rate(s, optim, max_steps) for s in range(max_steps)]


def test_constant_is_the_papers_schedule_and_warmup_is_linear():
    assert lrs(schedule="constant") == [1.0] * 100
    warm = lrs(schedule="constant", warmup_steps=4)
    assert warm[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_cosine_falls_from_lr_to_min_lr_after_warmup():
    cos = lrs(schedule="cosine", warmup_steps=10)
    assert cos[9] == 1.0 and cos[10] == 1.0
    assert cos[55] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(cos[10:], cos[11:])) and cos[-1] > 0.1


def test_warmup_stable_decay_holds_then_decays_linearly_over_the_last_fraction():
    wsd = lrs(schedule="wsd", warmup_steps=5, decay_fraction=0.2)
    assert wsd[5:80] == [1.0] * 75
    assert wsd[80] == pytest.approx(1.0 - 0.9 / 20) and wsd[99] == pytest.approx(0.1)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(4, 3)
        self.linear = torch.nn.Linear(3, 3)
        self.final_layernorm = torch.nn.LayerNorm(3, bias=False)


def test_a_step_is_due_for_each_interval_and_everything_at_the_end():
    config = load_config(
        TINY,
        [
            "train.max_steps=12",
            "train.log_interval=2",
            "eval.interval=3",
            "checkpoint.interval=5",
        ],
    )
    by_step = {s: due(s, config) for s in range(13)}
    assert [s for s, d in by_step.items() if d.log] == [0, 2, 4, 6, 8, 10, 12]
    assert [s for s, d in by_step.items() if d.eval] == [0, 3, 6, 9, 12]
    assert [s for s, d in by_step.items() if d.checkpoint] == [0, 5, 10, 12]
    assert [s for s, d in by_step.items() if d.final] == [12]
    assert not by_step[7].anything and by_step[9].anything
    assert due(7, config) == Due()


def test_intervals_of_0_are_off_but_the_last_step_still_logs_and_checkpoints():
    config = load_config(
        TINY,
        ["train.max_steps=7", "train.log_interval=4", "eval.interval=0", "checkpoint.interval=0"],
    )
    assert due(7, config) == Due(log=True, checkpoint=True, final=True)
    assert due(4, config) == Due(log=True)


def test_weight_decay_skips_the_configured_kinds():
    model = Tiny()
    kinds = {n: exclusion_kind(n, p) for n, p in model.named_parameters()}
    assert kinds == {
        "embedding.weight": "embeddings",
        "linear.weight": None,
        "linear.bias": "biases",
        "final_layernorm.weight": "norms",
    }
    decayed, plain = param_groups(model, 0.01, ["norms", "biases", "embeddings"])
    assert decayed["params"] == [model.linear.weight] and decayed["weight_decay"] == 0.01
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0.0
    (everything,) = param_groups(model, 0.01, [])
    assert len(everything["params"]) == 4
