"""The corpus is checked in full once per version of its files, the work dealt out over the
ranks; a restart over unchanged files reads none of them, and a changed token is still caught."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from lws_megatron.config import load_config
from lws_megatron.errors import UserError
from lws_megatron.training import data_verify
from lws_megatron.training.data import resolve_sources
from tests.helpers import TINY
from tests.helpers.dist_utils import run_distributed

pytestmark = pytest.mark.distributed


def _verify(prefix: str, tokenizer: str, cache: str, *overrides: str) -> tuple[list, int]:
    """(the splits this rank checked in full, how many times it read a dataset)."""
    config = load_config(TINY, [f"data.path=[{prefix}]", f"data.tokenizer={tokenizer}", *overrides])
    sources = resolve_sources(config, verify=False)
    reads = []
    real = data_verify.verify_dataset

    def counted(*args, **kwargs):
        reads.append(args[0])
        return real(*args, **kwargs)

    data_verify.verify_dataset = counted
    try:
        mine = data_verify.verify_sources(config, sources.prefixes, sources.tokenizer, Path(cache))
    except UserError as err:
        return [str(err)], len(reads)
    return [Path(s).name for s in mine], len(reads)


@pytest.fixture
def corpus(tmp_path, tiny_data) -> dict[str, str]:
    """A copy of the tiny corpus that a test may edit."""
    source = Path(tiny_data["prefix"])
    for path in source.parent.glob(source.name + "*"):
        shutil.copy2(path, tmp_path / path.name)
    return {"prefix": str(tmp_path / source.name), "tokenizer": tiny_data["tokenizer"]}


def test_the_first_check_is_shared_and_a_restart_reads_nothing(tmp_path, corpus):
    args = (corpus["prefix"], corpus["tokenizer"], str(tmp_path / "cache"))
    first = run_distributed(_verify, 2, *args)
    assert first == [(["data_train"], 1), (["data_valid"], 1)]  # one split each
    assert run_distributed(_verify, 2, *args) == [([], 0), ([], 0)]


def test_an_edited_token_is_still_refused_after_a_stamp(tmp_path, corpus):
    """Even with the file's size and modification time as they were."""
    args = (corpus["prefix"], corpus["tokenizer"], str(tmp_path / "cache"))
    run_distributed(_verify, 1, *args)
    path = corpus["prefix"] + "_train.bin"
    before = os.stat(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r+")
    tokens[1000] = (int(tokens[1000]) + 1) % 512  # still a valid id
    tokens.flush()
    del tokens
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (
        before.st_size,
        before.st_mtime_ns,
    )
    ((line,), reads), _ = run_distributed(_verify, 2, *args)
    assert reads == 1 and "data_train.bin differs from the one the manifest recorded" in line


def test_a_check_without_hashes_does_not_stand_for_one_with_them(tmp_path, corpus):
    args = (corpus["prefix"], corpus["tokenizer"], str(tmp_path / "cache"))
    assert run_distributed(_verify, 1, *args, "data.verify_hashes=false") == [
        (["data_train", "data_valid"], 2)
    ]
    assert run_distributed(_verify, 1, *args, "data.verify_hashes=false") == [([], 0)]
    assert run_distributed(_verify, 1, *args) == [(["data_train", "data_valid"], 2)]
    assert run_distributed(_verify, 1, *args, "data.verify_hashes=false") == [([], 0)]
