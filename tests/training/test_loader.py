"""Batches built ahead in workers are exactly the step's batches, from any step on."""

import pytest
import torch
from test_data import TINY

from lws_megatron.config import load_config
from lws_megatron.training.data import build_datasets, resolve_sources, step_batches
from lws_megatron.training.distributed import resolve_plan
from lws_megatron.training.loader import step_loader


@pytest.fixture(scope="module")
def train_ds(tmp_path_factory, tiny_data):
    config = load_config(
        TINY, [f"data.path=[{tiny_data['prefix']}]", f"data.tokenizer={tiny_data['tokenizer']}"]
    )
    dataset, _ = build_datasets(
        config, resolve_sources(config, verify=False), tmp_path_factory.mktemp("cache")
    )
    return config, dataset


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_gives_each_steps_batches_from_a_resumed_step(train_ds, workers):
    config, dataset = train_ds
    plan = resolve_plan(config, 2)  # this is DP rank 1 of 2
    loaded = list(step_loader(dataset, plan, 1, 7, 12, workers, torch.device("cpu")))
    assert [s.step for s in loaded] == [7, 8, 9, 10, 11]
    for got in loaded:
        expected = step_batches(dataset, got.step, plan, 1)
        assert len(got.batches) == len(expected)
        for a, b in zip(got.batches, expected):
            assert all(torch.equal(a[key], b[key]) for key in ("tokens", "labels", "loss_mask"))
        assert got.loss_tokens == int(sum(b["loss_mask"].sum() for b in expected))


class Broken:
    def __getitem__(self, i):
        raise ValueError(f"sample {i} is unreadable")


def test_a_failing_worker_raises_its_error_in_the_training_process(train_ds):
    config, _ = train_ds
    plan = resolve_plan(config, 1)
    with pytest.raises(ValueError, match="sample 0 is unreadable"):
        next(step_loader(Broken(), plan, 0, 0, 3, 1, torch.device("cpu")))
