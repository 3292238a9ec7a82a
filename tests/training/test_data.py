"""Training data: the blend of datasets, and the sample order as a pure function of the step."""

from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import preprocess
from lws_megatron.config import load_config
from lws_megatron.errors import UserError
from lws_megatron.training.data import build_datasets, parse_blend, resolve_sources, step_batches
from lws_megatron.training.distributed import resolve_plan
from tests.helpers import TINY
from tests.helpers.dist_utils import run_distributed


class Numbered:
    """Sample i is the sequence [i, i, ...]: batches show which samples they hold."""

    def __getitem__(self, i):
        row = torch.full((4,), i)
        return {"tokens": row, "labels": row, "loss_mask": torch.ones(4)}


def _samples(batches) -> list[int]:
    return [int(row[0]) for batch in batches for row in batch["tokens"]]


def test_global_batch_of_step_k_is_samples_k_g_to_k_plus_1_g_split_over_ranks():
    config = load_config(TINY, ["train.global_batch_size=8", "train.micro_batch_size=2"])
    plan = resolve_plan(config, 2)  # DP = 2: four samples a rank, two micro batches
    per_rank = [step_batches(Numbered(), 3, plan, rank) for rank in range(2)]
    assert [len(b) for b in per_rank] == [2, 2]
    assert all(batch["tokens"].shape == (2, 4) for b in per_rank for batch in b)
    assert _samples(per_rank[0]) + _samples(per_rank[1]) == list(range(24, 32))


def test_every_layout_reads_the_same_samples_per_step():
    for world, overrides in ((1, []), (2, []), (2, ["parallel.tp=2"])):
        config = load_config(TINY, overrides)
        plan = resolve_plan(config, world)
        seen = sorted(
            s for rank in range(plan.dp) for s in _samples(step_batches(Numbered(), 5, plan, rank))
        )
        assert seen == list(range(40, 48)), (world, overrides)


@pytest.mark.parametrize(
    "paths, expected",
    [
        (["a", "b"], (["a", "b"], None)),
        (["0.7", "a", "0.3", "b"], (["a", "b"], [0.7, 0.3])),
    ],
)
def test_blend_syntax(paths, expected):
    assert parse_blend(paths) == expected


@pytest.mark.parametrize(
    "paths, message",
    [
        ([], "data.path is empty"),
        (["0.7", "a", "0.3"], "alternates weight and prefix"),
        (["0.7", "a", "b", "c"], "alternates weight and prefix"),
        (["0", "a", "1", "b"], "must be > 0"),
    ],
)
def test_bad_blends_are_refused(paths, message):
    with pytest.raises(UserError, match=message):
        parse_blend(paths)


@pytest.mark.distributed
def test_weighted_blend_draws_each_dataset_by_its_weight(tmp_path, tiny_data):
    corpus = Path(tiny_data["prefix"]).parent / "corpus" / "pydocs.jsonl"
    other = tmp_path / "other"
    assert (
        preprocess.main(
            [
                "--input",
                str(corpus),
                "--tokenizer",
                tiny_data["tokenizer"],
                "--output-prefix",
                str(other),
                "--append-eod",
                "--valid-fraction",
                "0.05",
                "--quiet",
            ]
        )
        == 0
    )
    config = load_config(
        TINY,
        [
            f"data.path=['0.7', '{tiny_data['prefix']}', '0.3', '{other}']",
            f"data.tokenizer={tiny_data['tokenizer']}",
            "train.max_steps=250",
        ],
    )
    (drawn,) = run_distributed(_drawn_datasets, 1, config, str(tmp_path / "cache"), 2000)
    assert abs((drawn == 0).mean() - 0.7) < 0.02 and set(np.unique(drawn)) == {0, 1}


def _drawn_datasets(config, cache: str, count: int) -> np.ndarray:
    """Which dataset of the blend each of the first `count` training samples comes from."""
    train, _ = build_datasets(config, resolve_sources(config), Path(cache))
    return np.array([train.source(i)[0] for i in range(count)])
