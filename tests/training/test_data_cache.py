"""The run's data cache: keyed by the data's fingerprint, built once for all ranks, and never
a way to run code (Megatron unpickles its cached indices)."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import preprocess
from lws_megatron.config import load_config
from lws_megatron.errors import UserError
from lws_megatron.training.data import build_datasets, resolve_sources
from tests.helpers import TINY
from tests.helpers.dist_utils import run_distributed


def prepare(tiny_data, prefix: Path, documents: slice, *extra: str) -> str:
    """A dataset of some of the tiny corpus' documents at `prefix`; returns the prefix."""
    corpus = Path(tiny_data["prefix"]).parent / "corpus" / "pydocs.jsonl"
    lines = corpus.read_text().splitlines()[documents]
    subset = prefix.with_name(f"{prefix.name}-{documents.start}-{documents.stop}.jsonl")
    subset.write_text("\n".join(lines) + "\n")
    assert (
        preprocess.main(
            [
                "--input",
                str(subset),
                "--tokenizer",
                tiny_data["tokenizer"],
                "--output-prefix",
                str(prefix),
                "--append-eod",
                "--workers",
                "1",
                "--valid-fraction",
                "0.2",
                "--quiet",
                *extra,
            ]
        )
        == 0
    )
    return str(prefix)


def tiny_config(tiny_data, *paths: str, overrides=()):
    return load_config(
        TINY,
        [
            f"data.path={json.dumps(list(paths))}",
            f"data.tokenizer={tiny_data['tokenizer']}",
            *overrides,
        ],
    )


def tokens(dataset, count: int) -> torch.Tensor:
    return torch.stack([dataset[i]["tokens"] for i in range(count)])


def test_re_prepared_data_gets_its_own_cache(tmp_path, tiny_data):
    prefix = prepare(tiny_data, tmp_path / "data", slice(0, 100))
    config = tiny_config(tiny_data, prefix)
    old_train, _ = build_datasets(config, resolve_sources(config), tmp_path / "cache")
    old = tokens(old_train, 64)
    prepare(tiny_data, tmp_path / "data", slice(100, 160), "--overwrite")
    train, valid = build_datasets(config, resolve_sources(config), tmp_path / "cache")
    fresh_train, fresh_valid = build_datasets(config, resolve_sources(config), tmp_path / "new")
    assert torch.equal(tokens(train, 64), tokens(fresh_train, 64))
    assert torch.equal(tokens(valid, 16), tokens(fresh_valid, 16))
    assert not torch.equal(tokens(train, 64), old)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # old and new data, nothing partial


class Payload:
    """Unpickling this creates `marker`: the proof that loading the file ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _plant_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(marker)))


def _plant_object_array(path: Path, marker: Path) -> None:
    np.save(path, np.array([Payload(marker)], dtype=object), allow_pickle=True)


def _truncate(path: Path, marker: Path) -> None:
    path.write_bytes(path.read_bytes()[:-8])


@pytest.mark.parametrize(
    "plant, words",
    [
        (_plant_pickle, "is not a .npy array"),
        (_plant_object_array, "holds object, not plain numbers"),
        (_truncate, "bytes where its header promises"),
    ],
    ids=["pickle", "object-npy", "truncated"],
)
def test_a_tampered_cached_index_is_refused_unread(tmp_path, tiny_data, plant, words):
    config = tiny_config(tiny_data, tiny_data["prefix"])
    sources = resolve_sources(config, verify=False)
    build_datasets(config, sources, tmp_path / "cache")
    (target,) = (tmp_path / "cache").glob("*/*-train-shuffle_index.npy")
    marker = tmp_path / "ran"
    plant(target, marker)
    with pytest.raises(UserError, match=words) as refused:
        build_datasets(config, sources, tmp_path / "cache")
    assert str(target) in str(refused.value)
    assert f"delete {target.parent}" in str(refused.value)
    assert not marker.exists()


def test_without_the_check_the_planted_pickle_would_run(tmp_path):
    """What the refusal prevents: Megatron's own load of its cached index unpickles."""
    marker = tmp_path / "ran"
    _plant_pickle(tmp_path / "index.npy", marker)
    np.load(tmp_path / "index.npy", allow_pickle=True, mmap_mode="r")
    assert marker.exists()


@pytest.mark.slow
def test_ranks_share_one_cache_built_by_rank_0(tmp_path, tiny_data):
    config = tiny_config(tiny_data, tiny_data["prefix"])
    first, second = run_distributed(_first_tokens, 2, config, str(tmp_path / "cache"))
    assert torch.equal(first, second)
    (directory,) = (tmp_path / "cache").iterdir()
    assert len(list(directory.glob("*.npy"))) == 6  # three indices for each of two splits


def _first_tokens(config, cache: str) -> torch.Tensor:
    train, _ = build_datasets(config, resolve_sources(config, verify=False), Path(cache))
    return tokens(train, 16)
