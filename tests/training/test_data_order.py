"""The sample sequence depends on the data and the seed only: never on train.max_steps."""

import signal
import subprocess
from collections import Counter

import numpy as np
import pytest
import torch
from test_data_cache import prepare, tiny_config, tokens
from test_training import ROOT, command, records, train

from lws_megatron.errors import UserError
from lws_megatron.training.data import build_datasets, resolve_sources, step_batches
from lws_megatron.training.distributed import resolve_plan
from lws_megatron.training.sampling import BLEND_PERIOD, Blend


@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_data) -> str:
    """60 documents: about 3,700 samples of 32 tokens, so a long run wraps it many times."""
    return prepare(tiny_data, tmp_path_factory.mktemp("small") / "small", slice(0, 60))


def _steps(config, cache, count: int) -> list[torch.Tensor]:
    train_ds, _ = build_datasets(config, resolve_sources(config, verify=False), cache)
    plan = resolve_plan(config, 1)
    return [
        batch["tokens"] for step in range(count) for batch in step_batches(train_ds, step, plan, 0)
    ]


@pytest.mark.parametrize("blend", [False, True], ids=["one-prefix", "weighted-blend"])
def test_first_steps_are_the_same_for_any_max_steps(tmp_path, tiny_data, small, blend):
    paths = ["0.6", tiny_data["prefix"], "0.4", small] if blend else [tiny_data["prefix"]]
    short, long = (
        tiny_config(tiny_data, *paths, overrides=[f"train.max_steps={steps}"])
        for steps in (4, 100000)
    )  # the long run is 20 passes over the tiny corpus
    first = _steps(short, tmp_path / "short", 4)
    again = _steps(long, tmp_path / "long", 4)
    assert len(first) == 16 and all(torch.equal(a, b) for a, b in zip(first, again))


def test_a_run_past_one_epoch_reads_it_again_in_a_new_order(tmp_path, tiny_data, small):
    config = tiny_config(tiny_data, small)
    train_ds, _ = build_datasets(config, resolve_sources(config, verify=False), tmp_path)
    n = train_ds.streams[0].size
    epochs = tokens(train_ds, 3 * n).view(3, n, -1)
    multisets = [Counter(tuple(row.tolist()) for row in epoch) for epoch in epochs]
    assert multisets[0] == multisets[1] == multisets[2]
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    again, _ = build_datasets(config, resolve_sources(config, verify=False), tmp_path)
    assert torch.equal(tokens(again, 3 * n).view(3, n, -1), epochs)


class Numbered:
    def __getitem__(self, i):
        return i


def test_blend_reads_every_stream_in_order_at_its_weight_across_periods():
    blend = Blend([Numbered(), Numbered(), Numbered()], [0.5, 0.3, 0.2], ["a", "b", "c"])
    drawn = [blend.source(i) for i in range(3 * BLEND_PERIOD + 1000)]
    next_sample = [0, 0, 0]
    for stream, sample in drawn:  # no sample of a stream skipped or read twice
        assert sample == next_sample[stream]
        next_sample[stream] += 1
    shares = np.array(next_sample) / len(drawn)
    np.testing.assert_allclose(shares, [0.5, 0.3, 0.2], atol=3 / BLEND_PERIOD)
    assert [blend[i] for i in (0, BLEND_PERIOD + 7)] == [drawn[0][1], drawn[BLEND_PERIOD + 7][1]]


def test_a_share_too_small_to_draw_is_refused():
    with pytest.raises(UserError, match="data.path: b would be 1e-07 of the blend"):
        Blend([Numbered(), Numbered()], [1.0, 1e-7], ["a", "b"])


@pytest.mark.slow
def test_pretrain_step_losses_do_not_depend_on_max_steps(tmp_path, tiny_data):
    short, _ = train(tmp_path, "short", 1, tiny_data, "train.max_steps=4")
    run_dir = tmp_path / "long"
    proc = subprocess.Popen(
        command(1, run_dir, tiny_data, "train.max_steps=100000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    for line in proc.stdout:
        if line.startswith("step      2/"):
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, out
    long_losses, short_losses = records(run_dir), records(short)
    assert {1, 2} <= long_losses.keys()
    assert all(long_losses[s] == short_losses[s] for s in long_losses if s <= 4)


def test_a_split_shorter_than_one_sample_is_refused(tmp_path, tiny_data, small):
    config = tiny_config(tiny_data, small, overrides=["model.seq_length=1000000"])
    with pytest.raises(UserError, match="small_train holds fewer than model.seq_length"):
        build_datasets(config, resolve_sources(config, verify=False), tmp_path)
